//! JWKS documents through `auth::jwks::parse_jwks`: never panics; an accepted set holds 1..=64 non-weak
//! Ed25519 keys, each present in the document under its kid.
//!
//! The invariants live in `fuzz/checks.rs` (`check_jwks`), shared with `tests/fuzz_regressions.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_jwks(data));
