//! Push and pull (SPEC §2-4).
