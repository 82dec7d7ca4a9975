//! Cursors and field timestamps through `protocol::time::parse_rfc3339` and `format_cursor`: never
//! panics; `parse_rfc3339(format_cursor(v)) == v` for years 1..9999; cursors are always 27 bytes and their
//! string order equals time order.
//!
//! The invariants live in `fuzz/checks.rs` (`check_timestamp`), shared with `tests/fuzz_regressions.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_timestamp(data));
