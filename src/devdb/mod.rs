//! Embedded development/test PostgreSQL ("devdb").
//!
//! This module owns the lifecycle of a private, real PostgreSQL server that
//! mana-sync runs for itself when `DATABASE_URL` is unset (`serve`, `migrate`):
//!
//! * locating the installed server binaries ([`find_binaries`], `binaries.rs`),
//! * creating the cluster on first start (`initdb`) and reusing it afterwards,
//! * running `postgres` as a child process that listens on a Unix socket only
//!   (no TCP port, so nothing collides with a system PostgreSQL and nothing is
//!   reachable from the network),
//! * creating the unprivileged `mana_sync` role and database, so development
//!   exercises the same privilege boundaries (no superuser, no BYPASSRLS) as
//!   production,
//! * stopping the server again — on [`EmbeddedPostgres::stop`], on drop, and
//!   even when our process is SIGKILLed (see [`WRAPPER_SCRIPT`]).
//!
//! Files: `server.rs` (start, readiness, role and database, stop), `binaries.rs`
//! (where the binaries are), `ownership.rs` (running as the `postgres` user when
//! root, private directories), `setup.rs` (connection strings, role and database).
//! The cluster the test suite shares (`test_cluster.rs`: [`test_cluster`],
//! [`EmbeddedPostgres::create_database`]) exists only with the `test-support`
//! feature, which `cargo test`, `bench/` and `fuzz/` turn on; the release binary
//! has none of it.
//!
//! Why a real server rather than a mock: the sync server relies on
//! PostgreSQL semantics (row level security, transactions, LISTEN/NOTIFY),
//! which only the real thing reproduces faithfully.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

mod binaries;
mod ownership;
mod server;
mod setup;
#[cfg(feature = "test-support")]
mod test_cluster;
// The tests need the shared cluster, so they run with the feature (as `cargo test` does).
#[cfg(all(test, feature = "test-support"))]
mod tests;

pub(crate) use binaries::find_binaries;
pub use server::EmbeddedPostgres;
pub use setup::connect;
#[cfg(feature = "test-support")]
pub use test_cluster::{test_cluster, TestCluster};

/// Role and database the application uses. Deliberately not a superuser.
pub(crate) const APP_ROLE: &str = "mana_sync";
/// Database owned by [`APP_ROLE`].
pub const APP_DATABASE: &str = "mana_sync";
/// Bootstrap superuser created by `initdb -U`.
pub(crate) const SUPERUSER: &str = "postgres";

/// How long we wait for a freshly started server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before we kill the process group.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// `sun_path` is 108 bytes on Linux including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Socket file name for the default port (we never change the port: the
/// socket directory alone makes each cluster unique).
const SOCKET_NAME: &str = ".s.PGSQL.5432";
/// Written to the log before each start so error reports show only this run.
const LOG_MARKER: &str = "--- mana-sync devdb: starting postgres";

/// Shell wrapper that ties the server's lifetime to ours.
///
/// Invoked as `sh -c WRAPPER_SCRIPT name postgres-binary args…` with our end
/// of a pipe as its stdin. The kernel closes that pipe when our process exits
/// for *any* reason (including SIGKILL, which no Rust code can intercept), so
/// a watcher subshell blocked in `read` sees EOF and sends SIGINT (= fast
/// shutdown) to the postmaster. We also close the pipe on purpose to stop it.
///
/// The main shell waits for the postmaster rather than for stdin, so that a
/// server that fails during startup makes the wrapper exit at once and we can
/// report the failure instead of timing out. TERM/INT sent to the wrapper are
/// forwarded as a fast shutdown.
///
/// Details that matter:
/// * stdin is parked on fd 3 first, because POSIX shells redirect the stdin
///   of background jobs to /dev/null before explicit redirections apply;
/// * the postmaster gets neither the pipe nor our stdin;
/// * `wait` returns >128 when interrupted by a trapped signal, so we loop
///   only in that case and only while the postmaster still exists.
pub(crate) const WRAPPER_SCRIPT: &str = r#"exec 3<&0 0</dev/null
"$@" 3<&- &
pg=$!
{ while read -r line <&3; do :; done; kill -INT "$pg" 2>/dev/null; } &
watch=$!
exec 3<&-
trap 'kill -INT "$pg" 2>/dev/null' INT TERM
while :; do
  wait "$pg"; st=$?
  if [ "$st" -gt 128 ] && kill -0 "$pg" 2>/dev/null; then continue; fi
  break
done
kill "$watch" 2>/dev/null
exit "$st"
"#;

/// Errors from starting, preparing or stopping the embedded server.
#[derive(Debug)]
pub enum DevDbError {
    /// No directory with `initdb`, `postgres` and `pg_ctl`; the string lists
    /// where we looked.
    BinariesNotFound(String),
    /// File system or process spawning problem (message includes the path).
    Io(String),
    /// `initdb` failed; its output.
    InitDb(String),
    /// The server did not come up; the tail of its log.
    Start(String),
    /// Creating the role/database (or another SQL step) failed.
    Setup(String),
    /// The Unix socket path would exceed the kernel's limit.
    PathTooLong(PathBuf),
}

impl fmt::Display for DevDbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevDbError::BinariesNotFound(searched) => write!(
                f,
                "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found (looked in {searched}). \
                 Install PostgreSQL (Debian/Ubuntu: apt install postgresql; macOS: brew install postgresql) \
                 or set DATABASE_URL to an existing database."
            ),
            DevDbError::Io(msg) => write!(f, "embedded PostgreSQL: {msg}"),
            DevDbError::InitDb(out) => write!(
                f,
                "initdb failed while creating the embedded PostgreSQL cluster:\n{out}"
            ),
            DevDbError::Start(tail) => write!(
                f,
                "the embedded PostgreSQL server did not start. End of its log:\n{tail}"
            ),
            DevDbError::Setup(msg) => {
                write!(f, "preparing the embedded PostgreSQL database failed: {msg}")
            }
            DevDbError::PathTooLong(p) => write!(
                f,
                "the Unix socket path {} is {} bytes, but the limit is {MAX_SOCKET_PATH}. \
                 Choose a shorter data directory (e.g. under /tmp) or set DATABASE_URL.",
                p.display(),
                p.as_os_str().len()
            ),
        }
    }
}

impl std::error::Error for DevDbError {}

fn io_err(what: impl fmt::Display, e: impl fmt::Display) -> DevDbError {
    DevDbError::Io(format!("{what}: {e}"))
}

/// How to run the embedded server.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Cluster lives in `data_dir/pgdata`, the socket in `data_dir/run`, the
    /// server log in `data_dir/postgres.log`.
    pub data_dir: PathBuf,
    /// `false` (tests): fsync, synchronous_commit and full_page_writes off —
    /// much faster, but a crash of the machine may corrupt the cluster.
    pub durable: bool,
    /// Passed as `-c max_connections`.
    pub max_connections: u32,
    /// Directory with the server binaries; `None` = [`find_binaries`].
    pub bin_dir: Option<PathBuf>,
    /// Further `-c key=value` settings.
    pub extra_settings: Vec<(String, String)>,
    /// The directories of `PATH`, searched by [`find_binaries`] (this module
    /// reads no environment: `config` does, and the caller passes them in).
    pub search_path: Vec<PathBuf>,
    /// The process's working directory, which a relative `data_dir` is
    /// resolved against (`None`: `data_dir` must be absolute).
    pub working_dir: Option<PathBuf>,
}

impl EmbeddedOptions {
    /// Durable cluster with 100 connections under `data_dir`; binaries only in
    /// the usual places (no `PATH`).
    pub(crate) fn new(data_dir: impl Into<PathBuf>) -> Self {
        EmbeddedOptions {
            data_dir: data_dir.into(),
            durable: true,
            max_connections: 100,
            bin_dir: None,
            extra_settings: Vec::new(),
            search_path: Vec::new(),
            working_dir: None,
        }
    }

    /// The server's cluster: durable, under `config.data_dir`, binaries also
    /// searched on the `PATH` that `config` read.
    pub(crate) fn for_server(config: &crate::config::Config) -> Self {
        EmbeddedOptions {
            search_path: config.search_path.clone(),
            working_dir: config.working_dir.clone(),
            ..EmbeddedOptions::new(&config.data_dir)
        }
    }
}
