//! The test random generator, in one place: the lowest layer (it names nothing of the crate), so the unit
//! tests of every layer may use it, and `test_support` re-exports it to `tests/`, `bench/` and `fuzz/`.
//! Compiled only for tests and with the `test-support` feature.

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

    /// One of `items`, which must not be empty.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.index(items.len())]
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Puts `items` in a random order (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.index(i + 1));
        }
    }
}
