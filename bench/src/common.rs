//! What every scenario needs: a throwaway PostgreSQL cluster, signing keys and tokens, the real server
//! (in-process or as a child process), a keep-alive HTTP/1.1 client, WebSocket clients, RSS, results.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use mana_sync::auth::devkeys;
use mana_sync::config::Config;
/// The helpers tests and benchmarks share (`mana_sync::test_support`), and connecting to a cluster.
pub use mana_sync::devdb::connect as connect_pg;
use mana_sync::devdb::{EmbeddedOptions, EmbeddedPostgres};
use mana_sync::server::ServerHandle;
use mana_sync::startup;
use mana_sync::state::Shared;
pub use mana_sync::test_support::{percent_encode, Rng, USER_LOCK_CLASS};
use serde_json::Value;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, BoxError>;

pub fn err(msg: impl Into<String>) -> BoxError {
    msg.into().into()
}

/// A cursor before every row a scenario writes: reads from it page through the log (not a snapshot).
pub const LOG_START: &str = "2000-01-01T00:00:00.000Z";

// ---------------------------------------------------------------------------------------------------
// PostgreSQL

pub struct Cluster {
    pub pg: EmbeddedPostgres,
    /// As the ordinary role `mana_sync` (bound by row-level security), database `mana_sync`.
    pub app_conn: String,
    /// As the superuser `postgres`, database `mana_sync`.
    pub su_conn: String,
    pub durable: bool,
}

impl Cluster {
    pub async fn start(durable: bool) -> Result<Cluster> {
        let dir = (0..1000)
            .map(|n| PathBuf::from(format!("/tmp/msb-{}-{n}", std::process::id())))
            .find(|p| !p.exists())
            .ok_or_else(|| err("no free /tmp/msb-* directory"))?;
        let mut options = EmbeddedOptions::from_process_env(&dir);
        options.durable = durable;
        options.max_connections = 300;
        options.extra_settings = vec![
            ("shared_buffers".into(), "512MB".into()),
            ("max_wal_size".into(), "4GB".into()),
        ];
        let statements = std::env::var_os("MSB_PG_STAT_STATEMENTS").is_some();
        if statements {
            options.extra_settings.push((
                "shared_preload_libraries".into(),
                "pg_stat_statements".into(),
            ));
        }
        // Extra settings for a profiling run, e.g. MSB_PG_SETTINGS="auto_explain.log_min_duration=5ms".
        if let Ok(extra) = std::env::var("MSB_PG_SETTINGS") {
            for setting in extra.split(',').filter(|s| !s.is_empty()) {
                let (name, value) = setting
                    .split_once('=')
                    .ok_or_else(|| err("MSB_PG_SETTINGS: name=value,…"))?;
                options.extra_settings.push((name.into(), value.into()));
            }
        }
        let pg = EmbeddedPostgres::start(options).await?;
        if statements {
            let su =
                connect_pg(&pg.superuser_connection_string(mana_sync::devdb::APP_DATABASE)).await?;
            su.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                .await?;
        }
        let app_conn = pg.connection_string();
        let su_conn = pg.superuser_connection_string(mana_sync::devdb::APP_DATABASE);
        Ok(Cluster {
            pg,
            app_conn,
            su_conn,
            durable,
        })
    }

    /// Gives the database (its schema applied by a server) the shape of one that has been in use: `records` records of other users
    /// (spread over `users`) in the log and the merged state, their clocks, and fresh statistics. Without
    /// this the server's statements are planned against young, never-analysed tables (a generic plan made
    /// on a nearly empty `sync_records` scans a user's records instead of probing the primary key), which
    /// is a state a production database leaves within a minute (autovacuum's first ANALYZE).
    pub async fn seed_others(&self, users: usize, records: usize) -> Result<()> {
        let su = self.su().await?;
        let users = users.max(1) as i32;
        let records = records as i32;
        su.batch_execute("SET mana_sync.stamped = 'on'").await?;
        su.execute(
            concat!(
                "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, client_id, created_at) ",
                "SELECT 'todo', 'tasks', 's-' || g, 'seed-u' || (g % $1), 'insert', ",
                "jsonb_build_object('title', 'Seed ' || g), 'seed-d', ",
                "now() - interval '1 day' + g * interval '1 microsecond' FROM generate_series(1, $2) g"
            ),
            &[&users, &records],
        )
        .await?;
        su.execute(
            concat!(
                "INSERT INTO sync_records (user_id, app_id, table_name, record_id, state, updated_at) ",
                "SELECT user_id, app_id, table_name, record_id, '{}', created_at FROM sync_changes ",
                "WHERE user_id LIKE 'seed-u%'"
            ),
            &[],
        )
        .await?;
        su.execute(
            concat!(
                "INSERT INTO sync_user_clock (user_id, last_at, folded_at) ",
                "SELECT user_id, max(created_at), max(created_at) FROM sync_changes ",
                "WHERE user_id LIKE 'seed-u%' GROUP BY user_id"
            ),
            &[],
        )
        .await?;
        su.batch_execute("VACUUM ANALYZE").await?;
        Ok(())
    }

    pub async fn su(&self) -> Result<tokio_postgres::Client> {
        Ok(connect_pg(&self.su_conn).await?)
    }

    pub async fn app_role(&self) -> Result<tokio_postgres::Client> {
        Ok(connect_pg(&self.app_conn).await?)
    }

    pub async fn stop(self) {
        if std::env::var_os("MSB_PG_STAT_STATEMENTS").is_some() {
            self.print_statements().await;
        }
        let dir = self.pg.data_dir().to_path_buf();
        let _ = self.pg.stop().await;
        match std::env::var_os("MSB_KEEP_CLUSTER") {
            Some(_) => eprintln!("cluster kept in {} (MSB_KEEP_CLUSTER)", dir.display()),
            None => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

impl Cluster {
    /// With `MSB_PG_STAT_STATEMENTS` set: the statements that took the most time in the whole run.
    async fn print_statements(&self) {
        const TOP: &str = concat!(
            "SELECT calls, round(total_exec_time::numeric, 1)::text, ",
            "round(mean_exec_time::numeric * 1000, 1)::text, left(regexp_replace(query, '\\s+', ' ', 'g'), 110) ",
            "FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 20"
        );
        let Ok(su) = self.su().await else { return };
        let Ok(rows) = su.query(TOP, &[]).await else {
            return;
        };
        eprintln!("pg_stat_statements: calls | total ms | mean us | query");
        for row in rows {
            let (calls, total, mean, query): (i64, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            eprintln!("{calls:>9} | {total:>9} | {mean:>7} | {query}");
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Keys and tokens

pub struct Keys {
    pub kid: String,
    pub key: ed25519_dalek::SigningKey,
    pub jwks_path: PathBuf,
    dir: PathBuf,
}

impl Keys {
    pub fn create() -> Result<Keys> {
        let dir = std::env::temp_dir().join(format!("msb-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (key_path, jwks_path) = devkeys::write_dev_keys(&dir)?;
        let (kid, key) = devkeys::load_signing_key(&key_path)?;
        Ok(Keys {
            kid,
            key,
            jwks_path,
            dir,
        })
    }

    pub fn token(&self, user: &str) -> String {
        devkeys::mint_token(
            &self.kid,
            &self.key,
            user,
            Duration::from_secs(1800),
            None,
            Some("mana"),
            mana_sync::clock::unix_now(),
        )
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------------
// The server

/// Configuration like tests/it/support.rs `test_config()`, with limits opened for benchmarking.
pub fn server_config(cluster: &Cluster, keys: &Keys) -> Config {
    mana_sync::log::set_level(mana_sync::log::Level::Warn);
    let mut config = Config::defaults();
    config.database_url = Some(cluster.app_conn.clone());
    config.jwks_url = None;
    config.jwks_file = Some(keys.jwks_path.clone());
    config.port = 0;
    config.bind_address = "127.0.0.1".parse().unwrap();
    config.shutdown_timeout = Duration::from_secs(5);
    // One user's 1,000 sockets in the notify scenario.
    config.ws_max_per_user = 20_000;
    config.max_connections = 19_000;
    // For tuning runs: MSB_PUSH_GROUPS="turns,max[,after]" (the server's PUSH_GROUPS, PUSH_GROUP_MAX,
    // PUSH_GROUP_AFTER).
    if let Ok(value) = std::env::var("MSB_PUSH_GROUPS") {
        let numbers: Vec<Option<usize>> = value.split(',').map(|n| n.parse().ok()).collect();
        let get = |i: usize, default: usize| numbers.get(i).copied().flatten().unwrap_or(default);
        config.push_groups = get(0, config.push_groups);
        config.push_group_max = get(1, config.push_group_max);
        config.push_group_after = get(2, config.push_group_after);
    }
    config
}

pub struct InProcess {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    handle: Option<ServerHandle>,
}

impl InProcess {
    pub async fn start(cluster: &Cluster, keys: &Keys) -> Result<InProcess> {
        InProcess::start_with(cluster, keys, |_| {}).await
    }

    /// The same, with `adjust` changing the configuration first.
    pub async fn start_with(
        cluster: &Cluster,
        keys: &Keys,
        adjust: impl FnOnce(&mut Config),
    ) -> Result<InProcess> {
        let mut config = server_config(cluster, keys);
        adjust(&mut config);
        let shared = startup::build(config, cluster.app_conn.parse()?)
            .await
            .map_err(|e| err(e.0))?;
        let handle = ServerHandle::start(shared.clone(), "127.0.0.1:0".parse().unwrap()).await?;
        Ok(InProcess {
            addr: handle.addr,
            shared,
            handle: Some(handle),
        })
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop().await;
        }
        self.shared.store.close();
    }
}

/// The release binary of the main crate run as `mana-sync serve` in a process of its own.
pub struct Child {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub pid: u32,
}

pub fn server_binary() -> PathBuf {
    std::env::var_os("MANA_SYNC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target/release/mana-sync")
        })
}

impl Child {
    pub async fn start(cluster: &Cluster, keys: &Keys, extra: &[(&str, &str)]) -> Result<Child> {
        let bin = server_binary();
        if !bin.exists() {
            return Err(err(format!(
                "{} is missing: run `cargo build --release` in the repository root first",
                bin.display()
            )));
        }
        // A port below the ephemeral range (32768-60999 here), so that no client socket of a previous
        // run (thousands in TIME_WAIT) can hold it.
        let seed = std::process::id() as u64 ^ mana_sync::clock::unix_now() as u64;
        let port = (0..2000u64)
            .map(|n| 20_000 + ((seed.wrapping_mul(2_654_435_761) + n * 7919) % 12_000) as u16)
            .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .ok_or_else(|| err("no free port for the child server"))?;
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &cluster.app_conn)
            .env("JWKS_FILE", &keys.jwks_path)
            .env("JWKS_URL", "")
            .env("PORT", port.to_string())
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("LOG_LEVEL", "warn")
            .env("MAX_CONNECTIONS", "19500")
            .env("WS_MAX_PER_USER", "20000")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        let pid = child.id().ok_or_else(|| err("child has no pid"))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = HttpConn::connect(addr, None).await {
                if let Ok((200, _)) = c.get("/health", None).await {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(err("child server did not become healthy within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Child { child, addr, pid })
    }

    pub async fn stop(mut self) {
        // SIGTERM for a graceful stop, by pid (the child we started).
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// VmRSS and VmHWM of a process, in bytes.
pub fn rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

// ---------------------------------------------------------------------------------------------------
// HTTP: one keep-alive HTTP/1.1 connection (hyper client), as one device would hold.

pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> Result<HttpConn> {
        let stream = tcp_connect(addr, source).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConn {
            sender,
            host: addr.to_string(),
        })
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(u16, Bytes)> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    pub async fn get(&mut self, path: &str, auth: Option<&str>) -> Result<(u16, Bytes)> {
        match auth {
            Some(a) => {
                self.send("GET", path, &[("authorization", a)], Bytes::new())
                    .await
            }
            None => self.send("GET", path, &[], Bytes::new()).await,
        }
    }
}

pub async fn tcp_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<tokio::net::TcpStream> {
    let stream = match source {
        None => tokio::net::TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `"syncedUntil":"…"` of a compact JSON response, without parsing the whole body.
pub fn synced_until(body: &[u8]) -> Option<String> {
    let needle = b"\"syncedUntil\":\"";
    let start = body.windows(needle.len()).position(|w| w == needle)? + needle.len();
    let end = body[start..].iter().position(|&b| b == b'"')? + start;
    Some(String::from_utf8_lossy(&body[start..end]).into_owned())
}

// ---------------------------------------------------------------------------------------------------
// WebSockets

pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens `/ws`, authenticates and waits for `auth-ok`.
pub async fn authed_ws(
    addr: SocketAddr,
    source: Option<IpAddr>,
    token: &str,
    client_id: &str,
) -> Result<Ws> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let stream = tcp_connect(addr, source).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream).await?;
    let auth = serde_json::json!({"type": "auth", "token": token, "clientId": client_id});
    ws.send(Message::text(auth.to_string())).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(err("no auth-ok within 30 s")),
            Ok(None) => return Err(err("socket closed before auth-ok")),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str())?;
                if v["type"] == "auth-ok" {
                    return Ok(ws);
                }
                return Err(err(format!("expected auth-ok, got {t}")));
            }
            Ok(Some(Ok(Message::Close(f)))) => {
                return Err(err(format!("closed before auth-ok: {f:?}")))
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Results and statistics

pub struct Results {
    path: PathBuf,
    pub errors: u64,
}

impl Results {
    pub fn new(path: PathBuf) -> Results {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        Results { path, errors: 0 }
    }

    /// Appends one JSON line (with the scenario, a timestamp and the machine) to the results file.
    pub fn write(&self, scenario: &str, kind: &str, mut value: Value) {
        let obj = value.as_object_mut().expect("object");
        obj.insert("scenario".into(), scenario.into());
        obj.insert("kind".into(), kind.into());
        obj.insert("unix_time".into(), mana_sync::clock::unix_now().into());
        obj.insert("cores".into(), num_cpus().into());
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            Ok(mut f) => {
                let _ = writeln!(f, "{value}");
            }
            Err(e) => eprintln!("cannot write {}: {e}", self.path.display()),
        }
    }

    pub fn error(&mut self, what: impl std::fmt::Display) {
        self.errors += 1;
        eprintln!("ERROR: {what}");
    }
}

/// A closed-loop measurement: everything starts at `start` (a moment after it is planned, so every
/// connection is ready), results completing before `warm_end` are warm-up, the load stops at `end`.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub warm_end: Instant,
    pub end: Instant,
}

impl Window {
    pub fn starting_soon(warm: Duration, measured: Duration) -> Window {
        let start = Instant::now() + Duration::from_millis(200);
        Window {
            start,
            warm_end: start + warm,
            end: start + warm + measured,
        }
    }
    pub fn measured(&self) -> Duration {
        self.end - self.warm_end
    }
    /// Whether something that completed at `done` counts.
    pub fn counts(&self, done: Instant) -> bool {
        done >= self.warm_end && done <= self.end
    }
}

pub fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn fmt_bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// Percent-free cursor text for a timestamp `secs` after 2025-01-01T00:00:00Z (+ `micros`).
pub fn cursor_2025(secs: i64, micros: i64) -> String {
    // 2025-01-01T00:00:00Z = 1735689600 unix seconds.
    let t = 1_735_689_600i64 + secs;
    let days = t.div_euclid(86_400);
    let rem = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}
