//! Bearer tokens through `auth::verify_token` and `auth::decode_header` with a fixed Ed25519 key
//! (kid `k1`): never panics; Ok only for a token whose signature verifies and whose claims obey SPEC §8.
//! Inputs with a 0xFF byte are `header 0xFF claims`, signed with the fixed key, to reach the claim checks.
//!
//! The invariants live in `fuzz/checks.rs` (`check_jwt`), shared with `tests/fuzz_regressions.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_jwt(data));
