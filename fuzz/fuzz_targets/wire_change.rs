//! Stored rows through `StoredChange::to_wire` (data / field_meta / actor from fuzzed JSON): the emitted
//! JSON never has a top-level null for an optional key, updates carry `fields` with a `value` in every
//! entry, and a delete always has a `deletedAt` string.
//!
//! The invariants live in `fuzz/checks.rs` (`check_wire_change`), shared with `tests/fuzz_regressions.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_wire_change(data));
