//! Who runs the cluster (the `postgres` system user when we are root) and the
//! private directories it lives in.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use super::{io_err, DevDbError};

/// The account the server runs as, when it is not ourselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ClusterUser {
    uid: u32,
    gid: u32,
}

/// Effective uid without libc: `/proc/self` is owned by it.
fn running_as_root() -> bool {
    if let Ok(m) = fs::metadata("/proc/self") {
        return m.uid() == 0;
    }
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Looks up `name` in /etc/passwd: (uid, primary gid).
fn lookup_user(name: &str) -> Option<ClusterUser> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != name {
            return None;
        }
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some(ClusterUser { uid, gid })
    })
}

/// initdb and postgres refuse to run as root, so as root we hand the data
/// directory to the `postgres` system user and run the binaries as it.
pub(super) fn cluster_user() -> Result<Option<ClusterUser>, DevDbError> {
    if !running_as_root() {
        return Ok(None);
    }
    lookup_user("postgres").map(Some).ok_or_else(|| {
        DevDbError::Io(
            "running as root, but PostgreSQL refuses to run as root and there is no `postgres` \
             system user to run it as. Create one (useradd --system postgres), run mana-sync as \
             an ordinary user, or set DATABASE_URL."
                .into(),
        )
    })
}

/// As root, every ancestor of the data directory must be traversable by the
/// cluster user, or initdb/postgres fail with a confusing "permission denied".
pub(super) fn check_traversable(dir: &Path, user: ClusterUser) -> Result<(), DevDbError> {
    for anc in dir.ancestors().skip(1) {
        let m = fs::metadata(anc).map_err(|e| io_err(anc.display(), e))?;
        let mode = m.permissions().mode();
        let ok = mode & 0o001 != 0
            || (m.uid() == user.uid && mode & 0o100 != 0)
            || (m.gid() == user.gid && mode & 0o010 != 0);
        if !ok {
            return Err(DevDbError::Io(format!(
                "{} is not accessible to the `postgres` user (uid {}), so the server could not \
                 reach its data directory {}. Choose a data directory elsewhere (e.g. under /tmp \
                 or /var/lib) or run mana-sync as an ordinary user.",
                anc.display(),
                user.uid,
                dir.display()
            )));
        }
    }
    Ok(())
}

pub(super) fn chown(path: &Path, user: Option<ClusterUser>) -> Result<(), DevDbError> {
    if let Some(u) = user {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .map_err(|e| io_err(format!("chown {}", path.display()), e))?;
    }
    Ok(())
}

/// Creates `dir` (mode 0700: with trust authentication, whoever can reach the
/// socket can log in as superuser, so only the cluster owner — and root — may
/// enter) and hands it to the cluster user.
pub(super) fn make_private_dir(dir: &Path, user: Option<ClusterUser>) -> Result<(), DevDbError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
    }
    chown(dir, user)
}

/// Builds a command for a PostgreSQL binary, running as the cluster user.
pub(super) fn pg_command(program: &Path, user: Option<ClusterUser>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    // The child's cwd must be readable by the cluster user (postgres checks).
    cmd.current_dir(cwd).stdin(Stdio::null());
    if let Some(u) = user {
        cmd.uid(u.uid).gid(u.gid);
    }
    cmd
}
