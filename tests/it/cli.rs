//! The `mana-sync` binary as a process (SPEC §13, §14): help and usage, configuration errors that name the
//! variable, development keys and tokens, and the embedded default end to end — a fresh data directory,
//! its own PostgreSQL, push and pull over HTTP, SIGTERM, nothing left running, data kept across restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_mana-sync");

/// The binary with a clean environment: only what the system needs (PATH for the PostgreSQL binaries,
/// locale, HOME), so that no configuration of the machine running the tests leaks in.
fn mana_sync(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).env_clear().stdin(Stdio::null());
    for name in ["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("running mana-sync")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh, short directory under /tmp (the PostgreSQL socket path must stay short).
fn fresh_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = PathBuf::from(format!(
        "/tmp/mscli-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn help_and_usage() {
    for args in [&["--help"][..], &["-h"], &["help"]] {
        let out = run(&mut mana_sync(args));
        assert!(out.status.success(), "{args:?}: {out:?}");
        let stdout = text(&out.stdout);
        assert!(stdout.contains("Usage: mana-sync"), "{args:?}: {stdout}");
        for command in ["serve", "migrate", "keygen", "token", "help"] {
            assert!(
                stdout.contains(command),
                "{args:?} lists {command}: {stdout}"
            );
        }
    }
    for (command, usage) in [
        ("serve", "Usage: mana-sync serve"),
        ("migrate", "Usage: mana-sync migrate"),
        ("keygen", "Usage: mana-sync keygen"),
        ("token", "Usage: mana-sync token"),
    ] {
        for flag in ["--help", "-h"] {
            let out = run(&mut mana_sync(&[command, flag]));
            assert!(out.status.success(), "{command} {flag}: {out:?}");
            let stdout = text(&out.stdout);
            assert!(stdout.contains(usage), "{command} {flag}: {stdout}");
        }
    }
}

#[test]
fn unknown_commands_and_arguments_fail() {
    let out = run(&mut mana_sync(&["frobnicate"]));
    assert!(!out.status.success(), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("frobnicate"), "{stderr}");
    assert!(stderr.contains("Usage"), "{stderr}");

    // Unexpected arguments to commands that take none: refused before anything starts.
    for args in [&["serve", "--port", "1"][..], &["migrate", "extra"]] {
        let out = run(&mut mana_sync(args));
        assert!(!out.status.success(), "{args:?}: {out:?}");
        assert!(text(&out.stderr).contains("unexpected argument"), "{out:?}");
    }
    let dir = fresh_dir("badopt");
    let out = run(mana_sync(&["keygen", "--dir"]).env("MANA_SYNC_DATA_DIR", &dir));
    assert!(!out.status.success(), "{out:?}");
    assert!(!dir.exists(), "nothing written");
}

#[test]
fn bad_configuration_fails_naming_the_variable() {
    let dir = fresh_dir("badport");
    let out = run(mana_sync(&["serve"])
        .env("PORT", "notaport")
        .env("MANA_SYNC_DATA_DIR", &dir));
    assert!(!out.status.success(), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("PORT"), "{stderr}");
    assert!(
        !dir.exists(),
        "a bad configuration starts no database: {dir:?}"
    );

    let out = run(mana_sync(&["serve"])
        .env("JWKS_URL", "ftp://keys.example")
        .env("MANA_SYNC_DATA_DIR", &dir));
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("JWKS_URL"), "{out:?}");

    let out = run(mana_sync(&["serve"])
        .env("DB_POOL_SIZE", "0")
        .env("MANA_SYNC_DATA_DIR", &dir));
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("DB_POOL_SIZE"), "{out:?}");

    // TLS: one file without the other, and a certificate file that is not there.
    let out = run(mana_sync(&["serve"])
        .env("TLS_CERT_FILE", "/nonexistent/cert.pem")
        .env("MANA_SYNC_DATA_DIR", &dir));
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("TLS_KEY_FILE"), "{out:?}");
    let out = run(mana_sync(&["serve"])
        .env("TLS_CERT_FILE", "/nonexistent/cert.pem")
        .env("TLS_KEY_FILE", "/nonexistent/key.pem")
        .env("MANA_SYNC_DATA_DIR", &dir));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).contains("TLS_CERT_FILE=/nonexistent/cert.pem"),
        "{out:?}"
    );
    assert!(!dir.exists(), "a bad certificate starts no database");
}

#[test]
fn keygen_writes_once_and_token_mints() {
    let dir = fresh_dir("keys");
    let dir_arg = dir.to_str().unwrap();
    let out = run(&mut mana_sync(&["keygen", "--dir", dir_arg]));
    assert!(out.status.success(), "{out:?}");
    let key_path = dir.join("dev-signing-key.json");
    let jwks_path = dir.join("dev-jwks.json");
    let key_before = std::fs::read(&key_path).expect("key written");
    let jwks_before = std::fs::read(&jwks_path).expect("jwks written");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "private key is private: {mode:o}");
    }
    let jwks: Value = serde_json::from_slice(&jwks_before).unwrap();
    let jwk = &jwks["keys"][0];
    assert_eq!(jwk["kty"], json!("OKP"));
    assert_eq!(jwk["crv"], json!("Ed25519"));
    assert!(jwk.get("d").is_none(), "the public JWKS holds no secret");
    let kid = jwk["kid"].as_str().expect("kid").to_owned();

    // A second keygen refuses and leaves the key alone.
    let out = run(&mut mana_sync(&["keygen", "--dir", dir_arg]));
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("already exists"), "{out:?}");
    assert_eq!(std::fs::read(&key_path).unwrap(), key_before);
    assert_eq!(std::fs::read(&jwks_path).unwrap(), jwks_before);

    // --dir defaults to MANA_SYNC_DATA_DIR.
    let out = run(mana_sync(&["keygen"]).env("MANA_SYNC_DATA_DIR", &dir));
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&key_path).unwrap(), key_before);

    let key_arg = key_path.to_str().unwrap();
    let out = run(&mut mana_sync(&[
        "token", "--sub", "alice", "--key", key_arg,
    ]));
    assert!(out.status.success(), "{out:?}");
    let token = text(&out.stdout).trim().to_owned();
    let segments: Vec<&str> = token.split('.').collect();
    assert_eq!(segments.len(), 3, "{token}");
    assert!(segments.iter().all(|s| !s.is_empty()), "{token}");
    let header = mana_sync::auth::decode_header(&token).expect("decodable header");
    assert_eq!(header.alg, "EdDSA");
    assert_eq!(header.kid.as_deref(), Some(kid.as_str()));

    // The token verifies against the JWKS keygen wrote, with the default audience and sub alice.
    let keys = mana_sync::auth::jwks::read_jwks_file(&jwks_path).unwrap();
    let claims = mana_sync::auth::verify_token(
        &token,
        &keys,
        mana_sync::clock::unix_now(),
        &mana_sync::auth::Rules {
            issuer: None,
            audience: Some("mana"),
            leeway_secs: 0,
        },
    )
    .expect("token verifies");
    assert_eq!(claims.sub, "alice");
    let lifetime = claims.exp - mana_sync::clock::unix_now();
    assert!((800..=900).contains(&lifetime), "15 minutes: {lifetime}");

    // --sub is required; a missing key file is an error that says what to do.
    let out = run(&mut mana_sync(&["token", "--key", key_arg]));
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("--sub"), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let missing = dir.join("nope.json");
    let out = run(&mut mana_sync(&[
        "token",
        "--sub",
        "alice",
        "--key",
        missing.to_str().unwrap(),
    ]));
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("keygen"), "{out:?}");
    let out = run(&mut mana_sync(&[
        "token", "--sub", "alice", "--key", key_arg, "--ttl", "soon",
    ]));
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("--ttl"), "{out:?}");

    let _ = std::fs::remove_dir_all(&dir);
}

// ---- the embedded default, end to end ----------------------------------------------------------------

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP request; `Err` when the server cannot be reached (yet).
fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<(u16, Value), String> {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    );
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let result = match body {
        Some(body) => agent.run(builder.body(body).unwrap()),
        None => agent.run(builder.body(()).unwrap()),
    };
    let mut response = result.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let bytes = response
        .body_mut()
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// A `mana-sync serve` child with the embedded database under `dir`.
struct Served {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Served {
    fn start(dir: &Path, tag: &str) -> Served {
        // The free port may be taken by someone else before the server binds it; then try another.
        for attempt in 0..3 {
            let port = free_port();
            let log = PathBuf::from(format!("{}-{tag}.log", dir.display()));
            let out = std::fs::File::create(&log).unwrap();
            let err = out.try_clone().unwrap();
            let child = mana_sync(&["serve"])
                .env("MANA_SYNC_DATA_DIR", dir)
                .env("PORT", port.to_string())
                .env("BIND_ADDRESS", "127.0.0.1")
                .env("JWKS_URL", "")
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawning mana-sync serve");
            let mut served = Served { child, port, log };
            match served.wait_healthy() {
                Ok(()) => return served,
                Err(log) if attempt < 2 && log.contains("cannot listen") => continue,
                Err(log) => panic!("mana-sync serve did not come up:\n{log}"),
            }
        }
        unreachable!()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls /health until 200; `Err(log)` when the server exits first.
    fn wait_healthy(&mut self) -> Result<(), String> {
        // Safety net only: the first start runs initdb.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("exited with {status}:\n{}", self.log_text()));
            }
            if let Ok((200, body)) = http("GET", &self.url("/health"), &[], None) {
                assert_eq!(body["status"], json!("ok"));
                assert_eq!(body["database"], json!("ok"));
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!("never became healthy:\n{}", self.log_text()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then waits for a successful exit.
    fn terminate(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "mana-sync serve did not exit after SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "exit after SIGTERM: {status}\n{}",
            self.log_text()
        );
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // Only when a test failed half-way: do not leave the server (and its PostgreSQL) behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn mint(dir: &Path, sub: &str) -> String {
    let out = run(mana_sync(&["token", "--sub", sub]).env("MANA_SYNC_DATA_DIR", dir));
    assert!(out.status.success(), "{out:?}");
    text(&out.stdout).trim().to_owned()
}

fn pull_tasks(served: &Served, token: &str, device: &str) -> Vec<Value> {
    let auth = format!("Bearer {token}");
    let (status, body) = http(
        "GET",
        &served.url("/sync/todo/pull?collection=tasks&since=2000-01-01T00:00:00.000Z"),
        &[("authorization", &auth), ("x-client-id", device)],
        None,
    )
    .expect("pull");
    assert_eq!(status, 200, "{body}");
    body["serverChanges"].as_array().expect("changes").clone()
}

/// Pids of processes whose command line names the cluster directory of `dir`.
fn postgres_pids(dir: &Path) -> String {
    let out = Command::new("pgrep")
        .args(["-f", dir.join("pgdata").to_str().unwrap()])
        .output()
        .expect("running pgrep");
    text(&out.stdout)
}

/// Asserts that the PostgreSQL of `dir` runs (so that the check after shutdown means something).
fn assert_postgres_running(dir: &Path) {
    let pgdata = dir.join("pgdata");
    assert!(pgdata.join("postmaster.pid").exists(), "no postmaster.pid");
    assert!(
        !postgres_pids(dir).trim().is_empty(),
        "pgrep finds no postgres for {pgdata:?}"
    );
}

/// Asserts that no PostgreSQL of `dir` is running any more.
fn assert_no_postgres(dir: &Path) {
    let pgdata = dir.join("pgdata");
    assert!(
        !pgdata.join("postmaster.pid").exists(),
        "postmaster.pid remains in {pgdata:?}"
    );
    let pids = postgres_pids(dir);
    assert!(
        pids.trim().is_empty(),
        "postgres processes remain for {pgdata:?}: {pids}"
    );
}

#[test]
fn embedded_default_end_to_end() {
    let dir = fresh_dir("e2e");
    let out = run(mana_sync(&["keygen"]).env("MANA_SYNC_DATA_DIR", &dir));
    assert!(out.status.success(), "{out:?}");
    assert!(dir.join("dev-signing-key.json").exists());

    let served = Served::start(&dir, "first");
    assert!(
        dir.join("pgdata").join("PG_VERSION").exists(),
        "the cluster lives in the data directory"
    );
    let token = mint(&dir, "alice");

    // No token: the embedded set-up still requires one.
    let (status, body) = http(
        "GET",
        &served.url("/sync/todo/pull?collection=tasks&since=2000-01-01T00:00:00.000Z"),
        &[],
        None,
    )
    .unwrap();
    assert_eq!((status, &body["error"]), (401, &json!("missing_token")));

    let auth = format!("Bearer {token}");
    let push = json!({
        "clientId": "dev-a",
        "since": "2000-01-01T00:00:00.000Z",
        "changes": [{"table": "tasks", "id": "task-1", "op": "insert",
                     "data": {"id": "task-1", "title": "Buy milk"}}],
    });
    let (status, body) = http(
        "POST",
        &served.url("/sync/todo"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("x-client-id", "dev-a"),
        ],
        Some(push.to_string().into_bytes()),
    )
    .expect("push");
    assert_eq!(status, 200, "{body}");

    let changes = pull_tasks(&served, &token, "dev-b");
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["id"], json!("task-1"));
    assert_eq!(changes[0]["data"]["title"], json!("Buy milk"));
    // The author does not get its own change back.
    assert!(pull_tasks(&served, &token, "dev-a").is_empty());

    assert_postgres_running(&dir);
    served.terminate();
    assert_no_postgres(&dir);

    // Same directory again: same cluster, same key, the row is still there.
    let served = Served::start(&dir, "second");
    let changes = pull_tasks(&served, &mint(&dir, "alice"), "dev-b");
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["id"], json!("task-1"));
    assert_eq!(changes[0]["data"]["title"], json!("Buy milk"));
    // Another user sees nothing of alice's.
    assert!(pull_tasks(&served, &mint(&dir, "bob"), "dev-b").is_empty());
    assert_postgres_running(&dir);
    served.terminate();
    assert_no_postgres(&dir);

    let _ = std::fs::remove_file(format!("{}-first.log", dir.display()));
    let _ = std::fs::remove_file(format!("{}-second.log", dir.display()));
    let _ = std::fs::remove_dir_all(&dir);
}
