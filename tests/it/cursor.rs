//! The cursor guarantee (SPEC §5).
