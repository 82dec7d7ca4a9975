//! Helpers shared by the test suite (`tests/`), the load tool (`bench/`) and the fuzz checks
//! (`fuzz/checks.rs`), each in one place. Only with the `test-support` feature (on for `cargo test`,
//! `bench/` and `fuzz/`); the release binary has none of it. The shared PostgreSQL cluster is
//! `devdb::test_cluster`, and connecting to a cluster is `devdb::connect`.

/// The advisory lock class of a user's lock (`pg_advisory_xact_lock(USER_LOCK_CLASS, hashtext(user_id))`),
/// for tests and benchmarks that take or look for the lock from outside the server: the store's own.
pub use crate::store::USER_LOCK_CLASS;

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

/// A small deterministic generator (xorshift64), so a failing run can be replayed from its seed and a
/// benchmark makes the same picks every run, without a dependency. The state must not be 0: build it
/// with [`Rng::new`] from any seed, or as `Rng(seed)` from a seed known to be non-zero.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// From any seed, 0 included (mixed with a constant, since xorshift stays at 0 forever).
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An index into something of length `len`.
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
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
}
