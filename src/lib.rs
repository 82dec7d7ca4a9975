//! mana-sync: the sync server for local-first apps.
//!
//! Browsers push batches of changes and pull what other devices wrote; PostgreSQL stores every change.
//! See ARCHITECTURE.md for the map of this crate and the invariants it keeps.

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod billing;
pub mod client_tls;
pub mod config;
pub mod devdb;
pub mod http;
pub mod hub;
pub mod log;
pub mod merge;
pub mod metrics;
pub mod notify;
pub mod protocol;
pub mod server;
pub mod server_tls;
pub mod sse;
pub mod store;
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod ws;
