//! Push bodies (`POST /sync/{appId}`) through `protocol::parse_changeset`: never panics; an accepted
//! changeset is storable (identifiers, no U+0000, field timestamps parse, every delete has a deletedAt) and
//! its changes come back out of `StoredChange::to_wire` as well-formed wire JSON.
//!
//! The invariants live in `fuzz/checks.rs` (`check_push_body`), shared with `tests/fuzz_regressions.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_push_body(data));
