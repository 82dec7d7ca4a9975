//! mana-sync: the sync server for local-first apps.
//!
//! Browsers push batches of changes and pull what other devices wrote; PostgreSQL stores every change.
//! See ARCHITECTURE.md for the map of this crate and the invariants it keeps.

#![forbid(unsafe_code)]

// Layers, highest first; a module names only modules below it (`.ci/layers` holds the table and checks it):
// startup → server → http → state → realtime → {store, auth, billing, devdb} → merge → protocol, with
// server_tls, config, metrics, log, clock and client_tls as leaves below them, and the tests' generator
// (test_rng) lowest of all.
pub mod startup;

pub mod server;
pub mod server_tls;

pub mod http;
pub mod state;

pub mod realtime;

pub mod auth;
pub mod billing;
pub mod store;

pub(crate) mod merge;
pub mod protocol;

pub mod client_tls;
pub mod clock;
pub mod config;
pub mod devdb;
pub mod log;
pub(crate) mod metrics;

#[cfg(any(test, feature = "test-support"))]
pub mod test_rng;
#[cfg(feature = "test-support")]
pub mod test_support;
