//! An SSE stream query plus `Last-Event-ID` through `protocol::realtime::parse_stream_query`: never
//! panics; accepted names are identifiers; `Last-Event-ID` wins over `since`; cursors round-trip.
//!
//! The invariants live in `fuzz/checks.rs` (`check_stream_query`), shared with `tests/fuzz_regressions.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_stream_query(data));
