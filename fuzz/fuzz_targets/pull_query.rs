//! Pull query strings through `protocol::query::parse_query` and `protocol::parse_pull_query`: never
//! panics; decoding round-trips through re-encoding; an accepted pull has a valid collection, a parseable
//! `since` and a limit in 1..=5000.
//!
//! The invariants live in `fuzz/checks.rs` (`check_pull_query`), shared with `tests/fuzz_regressions.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_pull_query(data));
