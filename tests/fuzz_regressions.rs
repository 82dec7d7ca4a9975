//! Replays the fuzz seeds (`fuzz/seeds/<target>/`) and saved crash inputs (`fuzz/regressions/<target>/`)
//! through the same library calls and invariant checks as the cargo-fuzz targets, without libFuzzer, so a
//! plain `cargo test` keeps every crash the fuzzers ever found fixed.
//!
//! The checks are `fuzz/checks.rs`, the very file the fuzz targets include.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The input files of one target directory, sorted; dotfiles (`.gitkeep`) are skipped.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.is_file())
        .filter(|path| {
            !path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs every input of `fuzz/<kind>/<target>/`; returns (inputs run, failure descriptions).
fn replay(kind: &str) -> (usize, Vec<String>) {
    let root = fuzz_dir().join(kind);
    let mut failures = Vec::new();
    let mut count = 0;
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries {
            let dir = entry.expect("readable directory entry").path();
            if !dir.is_dir() {
                continue;
            }
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !checks::CHECKS.iter().any(|(target, _)| *target == name) {
                failures.push(format!("{}: no fuzz target named {name:?}", dir.display()));
            }
        }
    }
    for (target, check) in checks::CHECKS {
        for file in inputs(&root.join(target)) {
            let data = std::fs::read(&file).expect("readable input file");
            count += 1;
            if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| check(&data))) {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string panic)");
                failures.push(format!("{}: {message}", file.display()));
            }
        }
    }
    (count, failures)
}

#[test]
fn every_target_has_seeds() {
    for (target, _) in checks::CHECKS {
        let dir = fuzz_dir().join("seeds").join(target);
        assert!(!inputs(&dir).is_empty(), "{} has no seeds", dir.display());
    }
}

#[test]
fn seeds_pass_the_checks() {
    let (count, failures) = replay("seeds");
    assert!(count > 0, "no seeds found under fuzz/seeds");
    assert!(
        failures.is_empty(),
        "seed inputs fail:\n{}",
        failures.join("\n")
    );
}

#[test]
fn regressions_pass_the_checks() {
    let (_, failures) = replay("regressions");
    assert!(
        failures.is_empty(),
        "regression inputs fail:\n{}",
        failures.join("\n")
    );
}

/// The seeds include a token minted with the fixed key that must be accepted, so the `jwt` target's
/// success path (and its invariants) is exercised rather than only rejections.
#[test]
fn the_valid_seed_token_is_accepted() {
    let token = std::fs::read_to_string(fuzz_dir().join("seeds/jwt/valid_token"))
        .expect("fuzz/seeds/jwt/valid_token");
    let mut keys = mana_sync::auth::KeySet::new();
    keys.insert(checks::KID, checks::signing_key().verifying_key());
    let claims =
        mana_sync::auth::verify_token(token.trim(), &keys, checks::NOW_UNIX, &checks::rules())
            .expect("the valid seed token verifies");
    assert_eq!(claims.sub, "user-1");
}
