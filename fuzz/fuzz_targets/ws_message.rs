//! A WebSocket client message through `protocol::realtime::parse_client_message`: never panics;
//! accepted auth messages are well-formed; anything over the 16 KiB cap is refused.
//!
//! The invariants live in `fuzz/checks.rs` (`check_ws_message`), shared with `tests/fuzz_regressions.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_ws_message(data));
