//! Helpers shared by the test suite (`tests/`), the load tool (`bench/`) and the fuzz checks
//! (`fuzz/checks.rs`), each in one place. Only with the `test-support` feature (on for `cargo test`,
//! `bench/` and `fuzz/`); the release binary has none of it. The shared PostgreSQL cluster is
//! `devdb::test_cluster`, and connecting to a cluster is `devdb::connect`.

/// The advisory lock class of a user's lock (`pg_advisory_xact_lock(USER_LOCK_CLASS, hashtext(user_id))`),
/// for tests and benchmarks that take or look for the lock from outside the server: the store's own.
pub use crate::store::USER_LOCK_CLASS;

pub use crate::test_rng::Rng;

/// Percent-encodes `text` for a query string: every byte but the unreserved characters of RFC 3986
/// (`A-Z a-z 0-9 - . _ ~`) becomes `%XX`.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved_bytes() {
        assert_eq!(percent_encode("aZ09-._~"), "aZ09-._~");
        assert_eq!(
            percent_encode("2026-11-21T10:05:00.000+01:00 ü&="),
            "2026-11-21T10%3A05%3A00.000%2B01%3A00%20%C3%BC%26%3D"
        );
    }

    #[test]
    fn the_generator_is_xorshift64_and_never_stuck_at_zero() {
        let mut rng = Rng(1);
        assert_eq!(rng.next(), 1_082_269_761);
        let mut zero = Rng::new(0);
        assert_ne!(zero.next(), 0);
        assert!((0..100).all(|_| zero.index(3) < 3));
    }

    #[test]
    fn picks_chances_and_shuffles_stay_within_their_input() {
        let mut rng = Rng::new(7);
        assert!((0..100).all(|_| [1, 2, 3].contains(&rng.pick(&[1, 2, 3]))));
        assert!((0..100).all(|_| !rng.chance(0) && rng.chance(100)));
        let mut items: Vec<u32> = (0..50).collect();
        rng.shuffle(&mut items);
        assert_ne!(items, (0..50).collect::<Vec<_>>());
        items.sort_unstable();
        assert_eq!(items, (0..50).collect::<Vec<_>>());
    }
}
