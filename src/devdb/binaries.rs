//! Where the PostgreSQL server binaries are installed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::DevDbError;

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub(super) fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "postgres", "pg_ctl"]
        .iter()
        .all(|b| is_executable(&dir.join(b)))
}

/// `/usr/lib/postgresql/<version>/bin` directories, highest version first.
fn debian_versioned_dirs() -> Vec<PathBuf> {
    let mut found: Vec<(Vec<u32>, PathBuf)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            if let Some(v) = version {
                found.push((v, e.path().join("bin")));
            }
        }
    }
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// Find the directory holding `initdb`, `postgres` and `pg_ctl`.
///
/// Order: `override_dir`; `pg_config --bindir` (pg_config found on
/// `search_path`, the directories of `$PATH`); the highest
/// `/usr/lib/postgresql/*/bin` (Debian/Ubuntu keep the server binaries off
/// `$PATH`); `/usr/local/pgsql/bin` (source builds); every directory of
/// `search_path` (Homebrew, Fedora, Arch, …).
///
/// An override that lacks the binaries is an error rather than a reason to
/// fall back: the caller asked for that specific installation.
pub(crate) fn find_binaries(
    override_dir: Option<&Path>,
    search_path: &[PathBuf],
) -> Result<PathBuf, DevDbError> {
    if let Some(dir) = override_dir {
        return if has_server_binaries(dir) {
            Ok(dir.to_path_buf())
        } else {
            Err(DevDbError::BinariesNotFound(format!(
                "{} (configured bin_dir)",
                dir.display()
            )))
        };
    }

    let mut searched: Vec<String> = Vec::new();
    if let Some(pg_config) = search_path
        .iter()
        .map(|d| d.join("pg_config"))
        .find(|p| is_executable(p))
    {
        searched.push(format!("`{} --bindir`", pg_config.display()));
        if let Ok(out) = std::process::Command::new(&pg_config)
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        {
            if out.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if has_server_binaries(&dir) {
                    return Ok(dir);
                }
            }
        }
    }

    searched.push("/usr/lib/postgresql/*/bin".into());
    if let Some(dir) = debian_versioned_dirs()
        .into_iter()
        .find(|d| has_server_binaries(d))
    {
        return Ok(dir);
    }

    let local = PathBuf::from("/usr/local/pgsql/bin");
    searched.push(local.display().to_string());
    if has_server_binaries(&local) {
        return Ok(local);
    }

    searched.push("$PATH".into());
    if let Some(dir) = search_path.iter().find(|d| has_server_binaries(d)) {
        return Ok(dir.clone());
    }

    Err(DevDbError::BinariesNotFound(searched.join(", ")))
}
