//! Method and path through `http::router::route` (byte 0 picks GET/POST/OPTIONS/PUT/DELETE/other):
//! never panics; routing is consistent across methods, only GET/POST reach a route, app ids are valid.
//!
//! The invariants live in `fuzz/checks.rs` (`check_router`), shared with `tests/fuzz_regressions.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_router(data));
