//! The running server: start (directories, `initdb`, a stale postmaster, the
//! wrapper, readiness, role and database), connection strings, stop.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::process::{Child, ChildStdin, Command};

use super::ownership::{
    check_traversable, chown, cluster_user, make_private_dir, pg_command, ClusterUser,
};
use super::setup::{conn_string, conn_value, connect, ensure_app_role, ensure_database};
use super::{
    find_binaries, io_err, DevDbError, EmbeddedOptions, APP_DATABASE, APP_ROLE, LOG_MARKER,
    MAX_SOCKET_PATH, READY_TIMEOUT, SOCKET_NAME, STOP_TIMEOUT, SUPERUSER, WRAPPER_SCRIPT,
};

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

/// Where one cluster keeps its files (all under the absolute data directory).
struct Layout {
    data_dir: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
}

impl Layout {
    /// Resolves a relative `data_dir` against `working_dir` and checks that the
    /// socket path fits the kernel's limit; creates nothing.
    fn new(data_dir: PathBuf, working_dir: Option<&Path>) -> Result<Layout, DevDbError> {
        let data_dir = if data_dir.is_absolute() {
            data_dir
        } else {
            working_dir
                .ok_or_else(|| {
                    DevDbError::Io(format!(
                        "data directory {} is relative, but the current directory is unknown",
                        data_dir.display()
                    ))
                })?
                .join(data_dir)
        };
        if data_dir.to_str().is_none() {
            return Err(DevDbError::Io(format!(
                "data directory {} is not valid UTF-8",
                data_dir.display()
            )));
        }
        let socket_dir = data_dir.join("run");
        let socket_path = socket_dir.join(SOCKET_NAME);
        if socket_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(DevDbError::PathTooLong(socket_path));
        }
        Ok(Layout {
            pgdata: data_dir.join("pgdata"),
            log_path: data_dir.join("postgres.log"),
            socket_dir,
            data_dir,
        })
    }

    /// Creates the private directories, owned by the cluster user.
    fn create_directories(&self, user: Option<ClusterUser>) -> Result<(), DevDbError> {
        make_private_dir(&self.data_dir, user)?;
        if let Some(u) = user {
            check_traversable(&self.data_dir, u)?;
        }
        make_private_dir(&self.pgdata, user)?;
        make_private_dir(&self.socket_dir, user)
    }
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
            search_path,
            working_dir,
        } = options;

        // 1. Binaries, directories, ownership.
        let bin_dir =
            tokio::task::spawn_blocking(move || find_binaries(bin_dir.as_deref(), &search_path))
                .await
                .map_err(|e| io_err("searching for PostgreSQL binaries", e))??;
        let layout = Layout::new(data_dir, working_dir.as_deref())?;
        let user = cluster_user()?;
        layout.create_directories(user)?;

        // 2. initdb on first start.
        if !layout.pgdata.join("PG_VERSION").exists() {
            init_cluster(&bin_dir, &layout, user, durable).await?;
        }

        // 3. A postmaster left over from an earlier run (e.g. we were killed
        // together with our wrapper) still holds the data directory; the
        // data directory belongs to us alone, so shut it down.
        if layout.pgdata.join("postmaster.pid").exists() {
            stop_stale_postmaster(&bin_dir, &layout.pgdata, &layout.data_dir, user).await?;
        }

        // 4. Start the server under the lifeline wrapper.
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
        let mut child = spawn_postgres(&bin_dir, &layout, user, &settings)?;
        let stdin = child.stdin.take();

        let Layout {
            data_dir,
            pgdata,
            socket_dir,
            log_path,
        } = layout;
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

        ensure_app_role(&su).await?;
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

    pub(super) fn with_port(&self, conn: String) -> String {
        match &self.port {
            Some(port) => format!("{conn} port={}", conn_value(port)),
            None => conn,
        }
    }

    /// Directory holding the server's Unix socket (for `test_cluster`).
    #[cfg(feature = "test-support")]
    pub(super) fn socket_dir(&self) -> &Path {
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

/// `initdb` of a new cluster: trust authentication on the private socket,
/// UTF-8, C locale.
async fn init_cluster(
    bin_dir: &Path,
    layout: &Layout,
    user: Option<ClusterUser>,
    durable: bool,
) -> Result<(), DevDbError> {
    let initdb = bin_dir.join("initdb");
    let mut cmd = pg_command(&initdb, user, &layout.data_dir);
    cmd.arg("-D").arg(&layout.pgdata).args([
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
        .map_err(|e| io_err(format!("running {}", initdb.display()), e))?;
    if !out.status.success() {
        return Err(DevDbError::InitDb(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )));
    }
    Ok(())
}

/// Spawns `postgres` with `settings` under the lifeline wrapper, its output
/// appended to the log after a start marker.
fn spawn_postgres(
    bin_dir: &Path,
    layout: &Layout,
    user: Option<ClusterUser>,
    settings: &[(String, String)],
) -> Result<Child, DevDbError> {
    let log_path = &layout.log_path;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| io_err(format!("opening {}", log_path.display()), e))?;
    chown(log_path, user)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let _ = writeln!(log, "{LOG_MARKER} (unix time {now})");
    let log_err = log
        .try_clone()
        .map_err(|e| io_err(format!("opening {}", log_path.display()), e))?;

    let mut cmd = pg_command(Path::new("/bin/sh"), user, &layout.data_dir);
    cmd.arg("-c")
        .arg(WRAPPER_SCRIPT)
        .arg("mana-sync-postgres")
        .arg(bin_dir.join("postgres"))
        .arg("-D")
        .arg(&layout.pgdata)
        .arg("-k")
        .arg(&layout.socket_dir);
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
    cmd.spawn()
        .map_err(|e| io_err("spawning /bin/sh for postgres", e))
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
