//! Embedded development/test PostgreSQL ("devdb").
//!
//! This module owns the lifecycle of a private, real PostgreSQL server that
//! mana-sync runs for itself when `DATABASE_URL` is unset, and that the test
//! suite shares between all tests of one test binary:
//!
//! * locating the installed server binaries ([`find_binaries`]),
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
//! Why a real server rather than a mock: the sync server relies on
//! PostgreSQL semantics (row level security, transactions, LISTEN/NOTIFY),
//! which only the real thing reproduces faithfully.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::process::{Child, ChildStdin, Command};

/// Role and database the application uses. Deliberately not a superuser.
pub const APP_ROLE: &str = "mana_sync";
/// Database owned by [`APP_ROLE`].
pub const APP_DATABASE: &str = "mana_sync";
/// Bootstrap superuser created by `initdb -U`.
pub const SUPERUSER: &str = "postgres";

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
pub const WRAPPER_SCRIPT: &str = r#"exec 3<&0 0</dev/null
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
}

impl EmbeddedOptions {
    /// Durable cluster with 100 connections under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EmbeddedOptions {
            data_dir: data_dir.into(),
            durable: true,
            max_connections: 100,
            bin_dir: None,
            extra_settings: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Binary discovery
// ---------------------------------------------------------------------------

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "postgres", "pg_ctl"]
        .iter()
        .all(|b| is_executable(&dir.join(b)))
}

fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default()
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
/// Order: `override_dir`; `pg_config --bindir` (pg_config found on `$PATH`);
/// the highest `/usr/lib/postgresql/*/bin` (Debian/Ubuntu keep the server
/// binaries off `$PATH`); `/usr/local/pgsql/bin` (source builds); every
/// directory on `$PATH` (Homebrew, Fedora, Arch, …).
///
/// An override that lacks the binaries is an error rather than a reason to
/// fall back: the caller asked for that specific installation.
pub fn find_binaries(override_dir: Option<&Path>) -> Result<PathBuf, DevDbError> {
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
    let path = path_dirs();

    if let Some(pg_config) = path
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
    if let Some(dir) = path.into_iter().find(|d| has_server_binaries(d)) {
        return Ok(dir);
    }

    Err(DevDbError::BinariesNotFound(searched.join(", ")))
}

// ---------------------------------------------------------------------------
// Users and ownership
// ---------------------------------------------------------------------------

/// The account the server runs as, when it is not ourselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClusterUser {
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
fn cluster_user() -> Result<Option<ClusterUser>, DevDbError> {
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
fn check_traversable(dir: &Path, user: ClusterUser) -> Result<(), DevDbError> {
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

fn chown(path: &Path, user: Option<ClusterUser>) -> Result<(), DevDbError> {
    if let Some(u) = user {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .map_err(|e| io_err(format!("chown {}", path.display()), e))?;
    }
    Ok(())
}

/// Creates `dir` (mode 0700: with trust authentication, whoever can reach the
/// socket can log in as superuser, so only the cluster owner — and root — may
/// enter) and hands it to the cluster user.
fn make_private_dir(dir: &Path, user: Option<ClusterUser>) -> Result<(), DevDbError> {
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
fn pg_command(program: &Path, user: Option<ClusterUser>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    // The child's cwd must be readable by the cluster user (postgres checks).
    cmd.current_dir(cwd).stdin(Stdio::null());
    if let Some(u) = user {
        cmd.uid(u.uid).gid(u.gid);
    }
    cmd
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Quotes a libpq key/value connection parameter when needed.
fn conn_value(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

fn conn_string(socket_dir: &Path, user: &str, dbname: &str) -> String {
    format!(
        "host={} user={} dbname={}",
        conn_value(&socket_dir.to_string_lossy()),
        conn_value(user),
        conn_value(dbname)
    )
}

/// Database names we create from code: plain identifiers, so they can be
/// interpolated into `CREATE DATABASE` without quoting games.
fn valid_db_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Last part of the server log written since the most recent start marker.
fn log_tail(log: &Path) -> String {
    const MAX: u64 = 8 * 1024;
    let Ok(mut f) = File::open(log) else {
        return format!("(no log at {})", log.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let text = match text.rfind(LOG_MARKER) {
        Some(i) => &text[i..],
        None => &text[..],
    };
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(40);
    format!(
        "{}\n(full log: {})",
        lines[start..].join("\n"),
        log.display()
    )
}

fn sql_err(context: &str, e: tokio_postgres::Error) -> DevDbError {
    match e.as_db_error() {
        Some(db) => DevDbError::Setup(format!("{context}: {}", db.message())),
        None => DevDbError::Setup(format!("{context}: {e}")),
    }
}

async fn connect(conn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    // The connection future drives the socket; it ends when the client drops.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Creates database `name` owned by the app role unless it exists.
/// CREATE DATABASE cannot run inside a transaction, hence check-then-create;
/// a concurrent creator winning the race shows up as duplicate_database
/// (42P04) or a unique violation on pg_database (23505), both fine.
async fn ensure_database(
    su: &tokio_postgres::Client,
    name: &str,
    fail_if_exists: bool,
) -> Result<(), DevDbError> {
    let exists = su
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .map_err(|e| sql_err("checking pg_database", e))?
        .is_some();
    if exists {
        if fail_if_exists {
            return Err(DevDbError::Setup(format!("database {name} already exists")));
        }
        return Ok(());
    }
    let stmt = format!("CREATE DATABASE {name} OWNER {APP_ROLE}");
    match su.batch_execute(&stmt).await {
        Ok(()) => Ok(()),
        Err(e) if !fail_if_exists && is_duplicate(&e) => Ok(()),
        Err(e) => Err(sql_err(&format!("creating database {name}"), e)),
    }
}

fn is_duplicate(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(
        e.code(),
        Some(c) if *c == SqlState::DUPLICATE_DATABASE
            || *c == SqlState::DUPLICATE_OBJECT
            || *c == SqlState::UNIQUE_VIOLATION
    )
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// A running embedded PostgreSQL server (see the module docs).
#[derive(Debug)]
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    /// The `port` setting when one was given (it also names the Unix socket), else PostgreSQL's default.
    port: Option<String>,
    /// Our end of the wrapper's lifeline pipe; closing it stops the server.
    stdin: Option<ChildStdin>,
    /// The `sh` wrapper (leader of its own process group).
    child: Option<Child>,
}

impl EmbeddedPostgres {
    /// Starts (creating on first use) the cluster described by `options` and
    /// makes sure the `mana_sync` role and database exist.
    pub async fn start(options: EmbeddedOptions) -> Result<EmbeddedPostgres, DevDbError> {
        let EmbeddedOptions {
            data_dir,
            durable,
            max_connections,
            bin_dir,
            extra_settings,
        } = options;

        // 1. Binaries, directories, ownership.
        let bin_dir = tokio::task::spawn_blocking(move || find_binaries(bin_dir.as_deref()))
            .await
            .map_err(|e| io_err("searching for PostgreSQL binaries", e))??;
        let data_dir = if data_dir.is_absolute() {
            data_dir
        } else {
            std::env::current_dir()
                .map_err(|e| io_err("current directory", e))?
                .join(data_dir)
        };
        if data_dir.to_str().is_none() {
            return Err(DevDbError::Io(format!(
                "data directory {} is not valid UTF-8",
                data_dir.display()
            )));
        }
        let pgdata = data_dir.join("pgdata");
        let socket_dir = data_dir.join("run");
        let socket_path = socket_dir.join(SOCKET_NAME);
        if socket_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(DevDbError::PathTooLong(socket_path));
        }
        let log_path = data_dir.join("postgres.log");

        let user = cluster_user()?;
        make_private_dir(&data_dir, user)?;
        if let Some(u) = user {
            check_traversable(&data_dir, u)?;
        }
        make_private_dir(&pgdata, user)?;
        make_private_dir(&socket_dir, user)?;

        // 2. initdb on first start.
        if !pgdata.join("PG_VERSION").exists() {
            let mut cmd = pg_command(&bin_dir.join("initdb"), user, &data_dir);
            cmd.arg("-D").arg(&pgdata).args([
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C",
            ]);
            if !durable {
                cmd.arg("--no-sync");
            }
            let out = cmd
                .output()
                .await
                .map_err(|e| io_err(format!("running {}", bin_dir.join("initdb").display()), e))?;
            if !out.status.success() {
                return Err(DevDbError::InitDb(format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stderr),
                    String::from_utf8_lossy(&out.stdout)
                )));
            }
        }

        // 3. A postmaster left over from an earlier run (e.g. we were killed
        // together with our wrapper) still holds the data directory; the
        // data directory belongs to us alone, so shut it down.
        if pgdata.join("postmaster.pid").exists() {
            stop_stale_postmaster(&bin_dir, &pgdata, &data_dir, user).await?;
        }

        // 4. Start the server under the lifeline wrapper.
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_err(format!("opening {}", log_path.display()), e))?;
        chown(&log_path, user)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let _ = writeln!(log, "{LOG_MARKER} (unix time {now})");
        let log_err = log
            .try_clone()
            .map_err(|e| io_err(format!("opening {}", log_path.display()), e))?;

        let mut cmd = pg_command(Path::new("/bin/sh"), user, &data_dir);
        cmd.arg("-c")
            .arg(WRAPPER_SCRIPT)
            .arg("mana-sync-postgres")
            .arg(bin_dir.join("postgres"))
            .arg("-D")
            .arg(&pgdata)
            .arg("-k")
            .arg(&socket_dir);
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), String::new()),
            ("max_connections".into(), max_connections.to_string()),
        ];
        if !durable {
            for k in ["fsync", "synchronous_commit", "full_page_writes"] {
                settings.push((k.into(), "off".into()));
            }
        }
        let port = extra_settings
            .iter()
            .rev()
            .find(|(key, _)| key == "port")
            .map(|(_, port)| port.clone());
        settings.extend(extra_settings);
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        // Own process group: a Ctrl-C in the terminal must reach mana-sync
        // only, which then shuts down gracefully while still able to use the
        // database; the server follows when the pipe closes.
        cmd.process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let mut child = cmd
            .spawn()
            .map_err(|e| io_err("spawning /bin/sh for postgres", e))?;
        let stdin = child.stdin.take();

        let mut server = EmbeddedPostgres {
            data_dir,
            pgdata,
            socket_dir,
            log_path,
            port,
            stdin,
            child: Some(child),
        };

        // 5./6. Wait for readiness, then create role and database. On any
        // failure, stop what we started rather than leaving it behind.
        match server.wait_ready_and_setup().await {
            Ok(()) => Ok(server),
            Err(e) => {
                let _ = server.shutdown().await;
                Err(e)
            }
        }
    }

    async fn wait_ready_and_setup(&mut self) -> Result<(), DevDbError> {
        let su_conn = self.superuser_connection_string("postgres");
        let deadline = Instant::now() + READY_TIMEOUT;
        let su = loop {
            match connect(&su_conn).await {
                Ok(c) => break c,
                Err(e) => {
                    if let Some(child) = self.child.as_mut() {
                        if let Ok(Some(status)) = child.try_wait() {
                            return Err(DevDbError::Start(format!(
                                "{}\n(postgres exited: {status})",
                                log_tail(&self.log_path)
                            )));
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(DevDbError::Start(format!(
                            "{}\n(not accepting connections after {}s: {e})",
                            log_tail(&self.log_path),
                            READY_TIMEOUT.as_secs()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };

        let role_exists = su
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&APP_ROLE])
            .await
            .map_err(|e| sql_err("checking pg_roles", e))?
            .is_some();
        if !role_exists {
            let stmt = format!("CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS");
            match su.batch_execute(&stmt).await {
                Ok(()) => {}
                Err(e) if is_duplicate(&e) => {}
                Err(e) => return Err(sql_err("creating role mana_sync", e)),
            }
        }
        // Re-assert the privilege boundary in case someone widened it by hand:
        // development must hit the same permission errors as production.
        su.batch_execute(&format!(
            "ALTER ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE"
        ))
        .await
        .map_err(|e| sql_err("configuring role mana_sync", e))?;
        ensure_database(&su, APP_DATABASE, false).await
    }

    /// `host=<socket dir> user=mana_sync dbname=mana_sync`.
    pub fn connection_string(&self) -> String {
        self.with_port(conn_string(&self.socket_dir, APP_ROLE, APP_DATABASE))
    }

    /// Connection string for the `postgres` superuser and `dbname`.
    pub fn superuser_connection_string(&self, dbname: &str) -> String {
        self.with_port(conn_string(&self.socket_dir, SUPERUSER, dbname))
    }

    fn with_port(&self, conn: String) -> String {
        match &self.port {
            Some(port) => format!("{conn} port={}", conn_value(port)),
            None => conn,
        }
    }

    /// Directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The (absolute) data directory given in the options.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The cluster directory (`data_dir/pgdata`).
    pub fn pgdata_dir(&self) -> &Path {
        &self.pgdata
    }

    /// The server log (`data_dir/postgres.log`).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

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
        Ok(self.with_port(conn_string(&self.socket_dir, APP_ROLE, name)))
    }

    /// Fast shutdown: closes the lifeline pipe and waits up to 15 s for the
    /// server to exit, then kills it.
    pub async fn stop(mut self) -> Result<(), DevDbError> {
        self.shutdown().await
    }

    async fn shutdown(&mut self) -> Result<(), DevDbError> {
        drop(self.stdin.take());
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(DevDbError::Io(format!(
                "postgres exited with {status} while stopping; see {}",
                self.log_path.display()
            ))),
            Ok(Err(e)) => Err(io_err("waiting for postgres to stop", e)),
            Err(_) => {
                // The wrapper leads its own process group, which contains the
                // postmaster and all backends: kill them all.
                if let Some(pgid) = child.id() {
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &format!("-{pgid}")])
                        .status()
                        .await;
                }
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(DevDbError::Io(format!(
                    "postgres did not stop within {}s and was killed; see {}",
                    STOP_TIMEOUT.as_secs(),
                    self.log_path.display()
                )))
            }
        }
    }
}

impl Drop for EmbeddedPostgres {
    /// Best effort, non-blocking: closing the pipe makes the wrapper shut the
    /// server down in the background (tokio reaps the wrapper later).
    fn drop(&mut self) {
        drop(self.stdin.take());
    }
}

async fn stop_stale_postmaster(
    bin_dir: &Path,
    pgdata: &Path,
    cwd: &Path,
    user: Option<ClusterUser>,
) -> Result<(), DevDbError> {
    let pg_ctl = bin_dir.join("pg_ctl");
    let status = pg_command(&pg_ctl, user, cwd)
        .arg("status")
        .arg("-D")
        .arg(pgdata)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| io_err(format!("running {}", pg_ctl.display()), e))?;
    // Exit code 0 = running; 3 = not running (a stale postmaster.pid from a
    // crash, which postgres itself cleans up on start).
    if !status.success() {
        return Ok(());
    }
    let out = pg_command(&pg_ctl, user, cwd)
        .arg("stop")
        .arg("-D")
        .arg(pgdata)
        .args(["-m", "fast", "-w", "-t", "30"])
        .output()
        .await
        .map_err(|e| io_err(format!("running {}", pg_ctl.display()), e))?;
    if !out.status.success() {
        return Err(DevDbError::Start(format!(
            "a PostgreSQL server from an earlier run is still using {} and could not be stopped:\n{}{}",
            pgdata.display(),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Shared cluster for test binaries
// ---------------------------------------------------------------------------

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
    pub superuser_conn_string: String,
    /// Directory holding the Unix socket.
    pub socket_dir: PathBuf,
    /// Cluster data directory (under /tmp).
    pub data_dir: PathBuf,
    requests: tokio::sync::mpsc::UnboundedSender<(String, Reply)>,
    counter: AtomicU64,
}

impl TestCluster {
    /// Creates an empty database `name` owned by `mana_sync`; returns its
    /// `mana_sync` connection string. Blocking; callable from any thread or
    /// runtime. Panics on failure (it is a test helper).
    pub fn create_database(&self, name: &str) -> String {
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

fn start_test_cluster() -> Result<TestCluster, DevDbError> {
    remove_stale_test_dirs();
    let base = Path::new("/tmp");
    let pid = std::process::id();
    let data_dir = (0..1000)
        .map(|n| base.join(format!("mana-sync-test-{pid}-{n}")))
        .find(|p| !p.exists())
        .ok_or_else(|| DevDbError::Io("no free /tmp/mana-sync-test-* directory".into()))?;

    let mut options = EmbeddedOptions::new(&data_dir);
    options.durable = false;
    options.max_connections = 300;

    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("mana-sync-test-postgres".into())
        .spawn(move || {
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
                let (req_tx, mut req_rx) =
                    tokio::sync::mpsc::unbounded_channel::<(String, Reply)>();
                let info = (
                    server.connection_string(),
                    server.superuser_connection_string("postgres"),
                    server.socket_dir().to_path_buf(),
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
        })
        .map_err(|e| io_err("spawning test cluster thread", e))?;

    let (conn_string, superuser_conn_string, socket_dir, req_tx) = ready_rx
        .recv()
        .map_err(|_| DevDbError::Io("test cluster thread died during start".into()))??;
    Ok(TestCluster {
        conn_string,
        superuser_conn_string,
        socket_dir,
        data_dir,
        requests: req_tx,
        counter: AtomicU64::new(0),
    })
}

fn pid_alive(pid: u32) -> bool {
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
fn postmaster_pid(pgdata: &Path) -> Option<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Fresh short directory under /tmp, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = PathBuf::from(format!("/tmp/devdb-{}-{tag}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn test_options(dir: &Path) -> EmbeddedOptions {
        let mut o = EmbeddedOptions::new(dir);
        o.durable = false;
        o.max_connections = 20;
        o
    }

    async fn wait_gone(pid: u32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !pid_alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        !pid_alive(pid)
    }

    #[test]
    fn finds_installed_binaries() {
        let dir = find_binaries(None).expect("PostgreSQL must be installed for these tests");
        assert!(has_server_binaries(&dir), "{}", dir.display());
    }

    #[test]
    fn helpers_quote_and_validate() {
        assert_eq!(conn_value("/tmp/x"), "/tmp/x");
        assert_eq!(conn_value("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(conn_value("it's"), r"'it\'s'");
        assert!(valid_db_name("test_1"));
        assert!(!valid_db_name(""));
        assert!(!valid_db_name("Robert'); DROP"));
        assert!(!valid_db_name(&"a".repeat(64)));
    }

    #[tokio::test]
    async fn data_survives_restart_and_role_is_unprivileged() {
        let dir = TempDir::new("persist");
        // Production settings: durable, so initdb and checkpoints fsync.
        let options = EmbeddedOptions::new(&dir.0);
        let t0 = Instant::now();
        let pg = EmbeddedPostgres::start(options.clone()).await.unwrap();
        eprintln!("first start (with initdb): {:?}", t0.elapsed());
        assert!(pg
            .connection_string()
            .contains("user=mana_sync dbname=mana_sync"));

        let c = connect(&pg.connection_string()).await.unwrap();
        let row = c
            .query_one(
                "SELECT rolsuper, rolbypassrls, current_database() \
                 FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .unwrap();
        assert!(!row.get::<_, bool>(0), "mana_sync must not be superuser");
        assert!(!row.get::<_, bool>(1), "mana_sync must not bypass RLS");
        assert_eq!(row.get::<_, String>(2), "mana_sync");
        c.batch_execute("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('kept')")
            .await
            .unwrap();
        drop(c);
        let t1 = Instant::now();
        pg.stop().await.unwrap();
        eprintln!("stop: {:?}", t1.elapsed());

        let t2 = Instant::now();
        let pg = EmbeddedPostgres::start(options).await.unwrap();
        eprintln!("second start: {:?}", t2.elapsed());
        let c = connect(&pg.connection_string()).await.unwrap();
        let body: String = c
            .query_one("SELECT body FROM notes", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(body, "kept");
        drop(c);
        pg.stop().await.unwrap();
    }

    #[tokio::test]
    async fn missing_binaries_are_reported() {
        let dir = TempDir::new("nobin");
        let empty = dir.0.join("empty-bin");
        fs::create_dir_all(&empty).unwrap();
        let mut o = test_options(&dir.0.join("data"));
        o.bin_dir = Some(empty.clone());
        let err = EmbeddedPostgres::start(o).await.unwrap_err();
        assert!(matches!(err, DevDbError::BinariesNotFound(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("Install PostgreSQL"), "{msg}");
        assert!(msg.contains(&empty.display().to_string()), "{msg}");
        assert!(msg.contains("DATABASE_URL"), "{msg}");
    }

    #[tokio::test]
    async fn too_long_socket_path_is_rejected() {
        let long = PathBuf::from("/tmp").join("d".repeat(100));
        let err = EmbeddedPostgres::start(test_options(&long))
            .await
            .unwrap_err();
        assert!(matches!(err, DevDbError::PathTooLong(_)), "{err:?}");
        assert!(err.to_string().contains("shorter data directory"));
        assert!(!long.exists(), "nothing should be created");
    }

    #[tokio::test]
    async fn dropping_stops_postgres() {
        let dir = TempDir::new("drop");
        let pg = EmbeddedPostgres::start(test_options(&dir.0)).await.unwrap();
        let pid = postmaster_pid(pg.pgdata_dir()).unwrap();
        assert!(pid_alive(pid));
        let t = Instant::now();
        drop(pg);
        assert!(
            wait_gone(pid, Duration::from_secs(10)).await,
            "postmaster {pid} survived drop"
        );
        eprintln!("postmaster gone {:?} after drop", t.elapsed());
    }

    /// Runs only when re-executed by `sigkill_stops_postgres`: starts a
    /// server, reports readiness, then waits to be SIGKILLed.
    #[test]
    fn sigkill_helper() {
        let Some(dir) = std::env::var_os("MANA_SYNC_DEVDB_SIGKILL_HELPER") else {
            return;
        };
        let dir = PathBuf::from(dir);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pg = EmbeddedPostgres::start(test_options(&dir)).await.unwrap();
            fs::write(dir.join("ready"), b"").unwrap();
            tokio::time::sleep(Duration::from_secs(120)).await;
            drop(pg);
        });
    }

    #[tokio::test]
    async fn sigkill_stops_postgres() {
        let dir = TempDir::new("kill");
        let module = module_path!().split_once("::").unwrap().1;
        let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                &format!("{module}::sigkill_helper"),
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MANA_SYNC_DEVDB_SIGKILL_HELPER", &dir.0)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.0.join("ready").exists() {
            assert!(Instant::now() < deadline, "helper did not start postgres");
            assert!(helper.try_wait().unwrap().is_none(), "helper exited early");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pid = postmaster_pid(&dir.0.join("pgdata")).unwrap();
        assert!(pid_alive(pid));
        helper.kill().unwrap(); // SIGKILL: no destructors run
        helper.wait().unwrap();
        let t = Instant::now();
        assert!(
            wait_gone(pid, Duration::from_secs(10)).await,
            "postmaster {pid} survived SIGKILL of its parent"
        );
        eprintln!("postmaster gone {:?} after SIGKILL", t.elapsed());
    }

    #[tokio::test]
    async fn recovers_from_stale_postmaster() {
        let dir = TempDir::new("stale");
        // Create the cluster, then start a server on it behind our back, as
        // if an earlier mana-sync had died leaving its postmaster running.
        EmbeddedPostgres::start(test_options(&dir.0))
            .await
            .unwrap()
            .stop()
            .await
            .unwrap();
        let bin = find_binaries(None).unwrap();
        let pgdata = dir.0.join("pgdata");
        let user = cluster_user().unwrap();
        let out = pg_command(&bin.join("pg_ctl"), user, &dir.0)
            .arg("start")
            .arg("-D")
            .arg(&pgdata)
            .arg("-l")
            .arg(dir.0.join("stale.log"))
            .arg("-o")
            .arg(format!(
                "-k {} -c listen_addresses=",
                dir.0.join("run").display()
            ))
            .arg("-w")
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stale = postmaster_pid(&pgdata).unwrap();
        assert!(pid_alive(stale));

        let pg = EmbeddedPostgres::start(test_options(&dir.0)).await.unwrap();
        assert!(wait_gone(stale, Duration::from_secs(5)).await);
        let fresh = postmaster_pid(&pgdata).unwrap();
        assert_ne!(fresh, stale);
        let c = connect(&pg.connection_string()).await.unwrap();
        c.batch_execute("SELECT 1").await.unwrap();
        drop(c);
        pg.stop().await.unwrap();
        assert!(!pid_alive(fresh));
    }

    #[tokio::test]
    async fn failed_start_reports_log_tail() {
        let dir = TempDir::new("badcfg");
        let mut o = test_options(&dir.0);
        o.extra_settings
            .push(("no_such_setting".into(), "1".into()));
        let err = EmbeddedPostgres::start(o).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DevDbError::Start(_)), "{err:?}");
        assert!(msg.contains("no_such_setting"), "{msg}");
    }

    #[test]
    fn test_cluster_is_shared() {
        let a = test_cluster();
        let b = test_cluster();
        assert!(std::ptr::eq(a, b));
        let name = format!("shared_{}", std::process::id());
        let conn = a.create_database(&name);
        assert!(conn.contains(&format!("dbname={name}")), "{conn}");
        let other = a.fresh_database();
        assert_ne!(conn, other);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = connect(&conn).await.unwrap();
            let row = c
                .query_one(
                    "SELECT current_user::text, \
                     (SELECT pg_get_userbyid(datdba)::text FROM pg_database \
                      WHERE datname = current_database()), \
                     (SELECT count(*) FROM pg_tables WHERE schemaname = 'public')",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), "mana_sync");
            assert_eq!(row.get::<_, String>(1), "mana_sync");
            assert_eq!(row.get::<_, i64>(2), 0);
            // Owner may create tables in its pristine database.
            c.batch_execute("CREATE TABLE t (x int)").await.unwrap();
            let su = connect(&a.superuser_conn_string).await.unwrap();
            su.batch_execute("SELECT 1").await.unwrap();
        });
    }
}
