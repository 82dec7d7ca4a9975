//! Test support (feature `test-support`, which `cargo test`, `bench/` and
//! `fuzz/` turn on; not in the release binary): the throwaway cluster all tests
//! of one test binary share, pristine databases for tests that need them, and
//! options that find the binaries on the process's own `PATH`.
//!
//! The one place outside `config` that reads the environment
//! (`ENV-READ-EXCEPTION`: [`EmbeddedOptions::from_process_env`]): tests and
//! benchmarks have no `Config` to take `PATH` from.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};

use super::setup::{conn_string, connect, ensure_database, sql_err};
use super::{io_err, DevDbError, EmbeddedOptions, EmbeddedPostgres, APP_ROLE};

impl EmbeddedOptions {
    /// [`EmbeddedOptions::new`], with the binaries also searched on this
    /// process's `PATH` and a relative `data_dir` resolved against its current
    /// directory (ENV-READ-EXCEPTION: test support only).
    pub fn from_process_env(data_dir: impl Into<PathBuf>) -> Self {
        EmbeddedOptions {
            search_path: std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default(),
            working_dir: std::env::current_dir().ok(),
            ..EmbeddedOptions::new(data_dir)
        }
    }
}

impl EmbeddedPostgres {
    /// Creates an empty database `name` (`[a-z0-9_]{1,63}`, must not exist)
    /// owned by `mana_sync` and returns a connection string for it as
    /// `mana_sync`. Meant for tests that need a pristine database.
    pub async fn create_database(&self, name: &str) -> Result<String, DevDbError> {
        if !valid_db_name(name) {
            return Err(DevDbError::Setup(format!(
                "invalid database name {name:?}: use 1-63 characters from [a-z0-9_]"
            )));
        }
        let su = connect(&self.superuser_connection_string("postgres"))
            .await
            .map_err(|e| sql_err("connecting as superuser", e))?;
        ensure_database(&su, name, true).await?;
        Ok(self.with_port(conn_string(self.socket_dir(), APP_ROLE, name)))
    }
}

/// Database names we create from code: plain identifiers, so they can be
/// interpolated into `CREATE DATABASE` without quoting games.
pub(super) fn valid_db_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

type Reply = mpsc::Sender<Result<String, DevDbError>>;

/// A throwaway, non-durable cluster shared by all tests of one test binary.
///
/// Tests each run on their own tokio runtime, and a server whose child
/// process and connections were registered with a runtime that has since
/// shut down would be unusable, so the cluster lives on a dedicated thread
/// with its own runtime for the whole life of the process. Postgres stops
/// when the test binary exits (the lifeline pipe closes).
#[derive(Debug)]
pub struct TestCluster {
    /// `mana_sync` connection string for the `mana_sync` database.
    pub conn_string: String,
    /// `postgres` superuser connection string for the `postgres` database.
    #[cfg(test)]
    pub(crate) superuser_conn_string: String,
    requests: tokio::sync::mpsc::UnboundedSender<(String, Reply)>,
    counter: AtomicU64,
}

impl TestCluster {
    /// Creates an empty database `name` owned by `mana_sync`; returns its
    /// `mana_sync` connection string. Blocking; callable from any thread or
    /// runtime. Panics on failure (it is a test helper).
    pub(crate) fn create_database(&self, name: &str) -> String {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send((name.to_string(), tx))
            .expect("test cluster thread is gone");
        match rx.recv().expect("test cluster thread is gone") {
            Ok(conn) => conn,
            Err(e) => panic!("creating test database {name}: {e}"),
        }
    }

    /// Like [`TestCluster::create_database`] with a generated unique name.
    pub fn fresh_database(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.create_database(&format!("test_{}_{n}", std::process::id()))
    }
}

/// The process-wide test cluster, started on first use. Panics if it cannot
/// be started (with the reason, e.g. missing binaries).
pub fn test_cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| start_test_cluster().unwrap_or_else(|e| panic!("{e}")))
}

/// What the cluster thread reports once the server is up: the `mana_sync` and
/// superuser connection strings, and where to send database requests.
type Ready = (
    String,
    String,
    tokio::sync::mpsc::UnboundedSender<(String, Reply)>,
);

fn start_test_cluster() -> Result<TestCluster, DevDbError> {
    remove_stale_test_dirs();
    let base = Path::new("/tmp");
    let pid = std::process::id();
    let data_dir = (0..1000)
        .map(|n| base.join(format!("mana-sync-test-{pid}-{n}")))
        .find(|p| !p.exists())
        .ok_or_else(|| DevDbError::Io("no free /tmp/mana-sync-test-* directory".into()))?;

    let mut options = EmbeddedOptions::from_process_env(&data_dir);
    options.durable = false;
    options.max_connections = 300;

    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("mana-sync-test-postgres".into())
        .spawn(move || run_cluster_thread(options, ready_tx))
        .map_err(|e| io_err("spawning test cluster thread", e))?;

    let ready = ready_rx
        .recv()
        .map_err(|_| DevDbError::Io("test cluster thread died during start".into()))??;
    Ok(TestCluster {
        conn_string: ready.0,
        #[cfg(test)]
        superuser_conn_string: ready.1,
        requests: ready.2,
        counter: AtomicU64::new(0),
    })
}

/// The cluster thread: its own runtime, the server, then database requests
/// until the process exits.
fn run_cluster_thread(options: EmbeddedOptions, ready_tx: mpsc::Sender<Result<Ready, DevDbError>>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready_tx.send(Err(io_err("building tokio runtime", e)));
            return;
        }
    };
    rt.block_on(async move {
        let server = match EmbeddedPostgres::start(options).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let (req_tx, mut req_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Reply)>();
        let info = (
            server.connection_string(),
            server.superuser_connection_string("postgres"),
            req_tx,
        );
        if ready_tx.send(Ok(info)).is_err() {
            return;
        }
        // Serve requests forever: the sender lives in a static, so
        // this thread (and the server) last until the process exits.
        while let Some((name, reply)) = req_rx.recv().await {
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                let _ = reply.send(server.create_database(&name).await);
            });
        }
    });
}

pub(super) fn pid_alive(pid: u32) -> bool {
    // A zombie has exited already; it only waits to be reaped.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// First line of `postmaster.pid` is the postmaster's pid.
pub(super) fn postmaster_pid(pgdata: &Path) -> Option<u32> {
    fs::read_to_string(pgdata.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Deletes `/tmp/mana-sync-test-<pid>-<n>` of test processes that are gone
/// (and whose postmaster is gone too). Best effort.
fn remove_stale_test_dirs() {
    let Ok(entries) = fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("mana-sync-test-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        if postmaster_pid(&e.path().join("pgdata")).is_some_and(pid_alive) {
            continue;
        }
        let _ = fs::remove_dir_all(e.path());
    }
}
