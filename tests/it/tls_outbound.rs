//! TLS on the connections the server opens (`client_tls`), against real parts the tests create: a test CA
//! and certificates (rcgen), a PostgreSQL cluster of its own with `ssl=on` listening on 127.0.0.1, and JWKS
//! and billing stand-ins served over HTTPS.
//!
//! The server certificate names `localhost` only, so connecting to `127.0.0.1` is the wrong host name for
//! `verify-full`; a second CA that signed nothing is the untrusted one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mana_sync::client_tls::{DatabaseConfig, OutboundTls};
use mana_sync::devdb::{EmbeddedOptions, EmbeddedPostgres};
use mana_sync::startup;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{keys, test_config, unique_user, TestServer, EPOCH};

/// A test CA, a server certificate it signed for `localhost`, and a second CA that signed nothing.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
}

/// The user the test PostgreSQL runs as when we are root (it refuses to run as root), by its ids.
fn postgres_ids() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").ok()?.uid() != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres"))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
            .flatten()
    })
}

fn pki(tag: &str) -> Pki {
    use std::os::unix::fs::PermissionsExt;
    let dir = PathBuf::from(format!("/tmp/ms-tls-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let authority = ca("mana-sync test CA");
    let stranger = ca("a CA nobody trusts");
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &authority)
        .unwrap();
    let pki = Pki {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other-ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        server: Arc::new(
            rustls::ServerConfig::builder_with_provider(mana_sync::client_tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![server_cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
                )
                .unwrap(),
        ),
        dir,
    };
    std::fs::write(&pki.ca, authority.pem()).unwrap();
    std::fs::write(&pki.other_ca, stranger.pem()).unwrap();
    std::fs::write(&pki.cert, server_cert.pem()).unwrap();
    std::fs::write(&pki.key, server_key.serialize_pem()).unwrap();
    // PostgreSQL insists on a private key only its own user can read.
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    if let Some((uid, gid)) = postgres_ids() {
        for path in [&pki.dir, &pki.ca, &pki.other_ca, &pki.cert, &pki.key] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        }
    }
    pki
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A PostgreSQL cluster of its own with `ssl=on` on 127.0.0.1:`port`. Database `sslonly` admits TCP
/// connections only over TLS (`hostssl`); role `mana_pw` only over TLS and with its password (SCRAM);
/// every other database and role connects over either without a password.
async fn tls_cluster(pki: &Pki) -> (EmbeddedPostgres, u16) {
    let port = free_port();
    let hba = pki.dir.join("pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\n\
         hostssl all mana_pw 127.0.0.1/32 scram-sha-256\n\
         host all mana_pw 127.0.0.1/32 reject\n\
         hostssl sslonly all 127.0.0.1/32 trust\n\
         hostnossl sslonly all 127.0.0.1/32 reject\n\
         host all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    if let Some((uid, gid)) = postgres_ids() {
        std::os::unix::fs::chown(&hba, Some(uid), Some(gid)).unwrap();
    }
    let mut options = EmbeddedOptions::from_process_env(pki.dir.join("pg"));
    options.durable = false;
    options.max_connections = 50;
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    options.extra_settings = vec![
        ("listen_addresses".into(), "127.0.0.1".into()),
        ("port".into(), port.to_string()),
        ("ssl".into(), "on".into()),
        ("ssl_cert_file".into(), path(&pki.cert)),
        ("ssl_key_file".into(), path(&pki.key)),
        ("hba_file".into(), path(&hba)),
    ];
    let server = EmbeddedPostgres::start(options)
        .await
        .expect("the TLS cluster starts");
    server
        .create_database("sslonly")
        .await
        .expect("database sslonly");
    let admin = crate::support::connect(&server.superuser_connection_string("postgres")).await;
    admin
        .batch_execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE mana_pw LOGIN PASSWORD 'secret pw'")
        .await
        .unwrap();
    (server, port)
}

/// Connects as `mana_sync` with `conn` through `client_tls` and asks PostgreSQL whether this session uses
/// TLS; `Err` carries the connection error's text (with its source).
async fn session_uses_tls(conn: &str) -> Result<bool, String> {
    let config: DatabaseConfig = conn.parse().map_err(|e| format!("{e}"))?;
    let (client, connection) = config
        .postgres
        .connect(config.tls.clone())
        .await
        .map_err(|e| {
            let source = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            format!("{e}: {source}")
        })?;
    let driver = tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    drop(client);
    let _ = driver.await;
    Ok(row.get(0))
}

/// Starts the real server (schema, role check, listener) with `DATABASE_URL` = `conn`; returns the start-up
/// error, which must come at once rather than after the 30 s of retries meant for a database still
/// starting.
async fn start_up_error(conn: &str) -> String {
    let mut config = test_config();
    config.database_url = Some(conn.to_owned());
    let started = Instant::now();
    let result = match startup::open_database(&config).await {
        Ok(database) => startup::build(config, database.config).await.map(drop),
        Err(e) => Err(e),
    };
    let error = result.expect_err(conn).to_string();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{conn}: refused only after {:?}: {error}",
        started.elapsed()
    );
    assert!(error.contains("DATABASE_URL"), "{conn}: {error}");
    error
}

#[tokio::test]
async fn every_sslmode_against_a_tls_cluster_does_what_libpq_does() {
    let pki = pki("modes");
    let (cluster, port) = tls_cluster(&pki).await;
    let ca = pki.ca.display().to_string();
    let other_ca = pki.other_ca.display().to_string();
    let kv = |host: &str, db: &str, rest: &str| {
        format!("host={host} port={port} user=mana_sync dbname={db} {rest}")
    };
    let url =
        |host: &str, query: &str| format!("postgres://mana_sync@{host}:{port}/mana_sync?{query}");

    // Accepted, and with TLS exactly when the mode asks for it.
    for (conn, tls) in [
        (kv("localhost", "mana_sync", "sslmode=disable"), false),
        // libpq's default is prefer: TLS when the server offers it.
        (kv("localhost", "mana_sync", ""), true),
        (url("localhost", "sslmode=prefer"), true),
        // require without a root certificate encrypts without checking the certificate.
        (kv("127.0.0.1", "mana_sync", "sslmode=require"), true),
        (
            kv(
                "127.0.0.1",
                "mana_sync",
                &format!("sslmode=require sslrootcert={ca}"),
            ),
            true,
        ),
        // verify-ca checks the chain, not the name.
        (
            kv(
                "127.0.0.1",
                "mana_sync",
                &format!("sslmode=verify-ca sslrootcert='{ca}'"),
            ),
            true,
        ),
        (
            kv(
                "localhost",
                "mana_sync",
                &format!("sslmode=verify-full sslrootcert={ca}"),
            ),
            true,
        ),
        (
            url(
                "localhost",
                &format!("sslrootcert={}&sslmode=verify-full", ca.replace('/', "%2F")),
            ),
            true,
        ),
        (kv("localhost", "sslonly", "sslmode=require"), true),
        // A password login (SCRAM) over verified TLS, and over TLS without verification, both bound to
        // the certificate (SCRAM-SHA-256-PLUS; `channel_binding=require` refuses a login without it).
        (
            format!("host=localhost port={port} user=mana_pw password='secret pw' dbname=mana_sync sslmode=verify-full sslrootcert={ca} channel_binding=require"),
            true,
        ),
        (
            format!("postgres://mana_pw:secret%20pw@127.0.0.1:{port}/mana_sync?sslmode=require&channel_binding=require"),
            true,
        ),
    ] {
        assert_eq!(session_uses_tls(&conn).await, Ok(tls), "{conn}");
    }

    // Refused, each for its own reason.
    for (conn, reason) in [
        // A certificate from a CA we were not told to trust: verify-ca, verify-full, and require with a
        // root certificate (libpq: then require verifies like verify-ca).
        (
            kv(
                "localhost",
                "mana_sync",
                &format!("sslmode=verify-ca sslrootcert={other_ca}"),
            ),
            "UnknownIssuer",
        ),
        (
            kv(
                "localhost",
                "mana_sync",
                &format!("sslmode=verify-full sslrootcert={other_ca}"),
            ),
            "UnknownIssuer",
        ),
        (
            kv(
                "localhost",
                "mana_sync",
                &format!("sslmode=require sslrootcert={other_ca}"),
            ),
            "UnknownIssuer",
        ),
        // A trusted certificate that does not name the host connected to.
        (
            url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "not valid for name",
        ),
        // pg_hba.conf admits this database over TLS only.
        (
            kv("localhost", "sslonly", "sslmode=disable"),
            "no encryption",
        ),
        (
            format!("host=localhost port={port} user=mana_pw password=wrong dbname=mana_sync sslmode=require"),
            "password authentication failed",
        ),
    ] {
        let error = session_uses_tls(&conn).await.expect_err(&conn);
        assert!(error.contains(reason), "{conn}: {error}");
    }

    // The same refusals through the server's start-up, which names DATABASE_URL and does not retry.
    for (conn, reason) in [
        (
            kv(
                "localhost",
                "mana_sync",
                &format!("sslmode=verify-full sslrootcert={other_ca}"),
            ),
            "UnknownIssuer",
        ),
        (
            kv(
                "127.0.0.1",
                "mana_sync",
                &format!("sslmode=verify-full sslrootcert={ca}"),
            ),
            "not valid for name",
        ),
        (
            kv("localhost", "sslonly", "sslmode=disable"),
            "no encryption",
        ),
        // Configuration errors stop start-up before anything connects.
        (
            kv("localhost", "mana_sync", "sslmode=verify_full"),
            "sslmode",
        ),
        (
            kv("localhost", "mana_sync", "sslmode=verify-full"),
            "needs sslrootcert",
        ),
        (
            kv(
                "localhost",
                "mana_sync",
                "sslmode=verify-ca sslrootcert=/nonexistent/ca.pem",
            ),
            "/nonexistent/ca.pem",
        ),
    ] {
        let error = start_up_error(&conn).await;
        assert!(error.contains(reason), "{conn}: {error}");
    }

    // And the binary itself: `mana-sync serve` exits at once with the reason, naming DATABASE_URL.
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mana-sync"))
            .arg("serve")
            .env(
                "DATABASE_URL",
                kv(
                    "127.0.0.1",
                    "mana_sync",
                    &format!("sslmode=verify-full sslrootcert={ca}"),
                ),
            )
            .env("PORT", "0")
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("JWKS_URL", "")
            .env("MANA_SYNC_DATA_DIR", pki.dir.join("serve"))
            .output(),
    )
    .await
    .expect("serve gives up within 20 s")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        stderr.contains("DATABASE_URL") && stderr.contains("not valid for name"),
        "{stderr}"
    );

    cluster.stop().await.expect("the TLS cluster stops");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn the_server_syncs_over_verify_full_and_every_connection_it_opens_uses_tls() {
    let pki = pki("sync");
    let (cluster, port) = tls_cluster(&pki).await;
    let conn = format!(
        "postgres://mana_sync@localhost:{port}/mana_sync?sslmode=verify-full&sslrootcert={}",
        pki.ca.display()
    );
    let server = TestServer::start_with(|c| c.database_url = Some(conn.clone())).await;

    let user = unique_user("tls");
    let body = json!({"since": EPOCH, "changes": [
        {"table": "tasks", "id": "t1", "op": "insert", "data": {"title": "over TLS"}}]});
    let pushed = server.push(&user, "todo", Some("laptop"), &body).await;
    assert_eq!(pushed.status, 200, "{}", pushed.text);
    let pulled = server
        .pull(&user, "todo", Some("phone"), "tasks", EPOCH, None)
        .await;
    assert_eq!(pulled.status, 200, "{}", pulled.text);
    assert!(pulled.text.contains("over TLS"), "{}", pulled.text);

    // Our sessions as PostgreSQL sees them: the pool's and the notification listener's, all over TLS.
    let admin = crate::support::connect(&cluster.superuser_connection_string("postgres")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let sessions = loop {
        let rows = admin
            .query(
                "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.usename = 'mana_sync'",
                &[],
            )
            .await
            .unwrap();
        let sessions: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if sessions
            .iter()
            .any(|(name, _)| name == "mana-sync listener")
            || Instant::now() > deadline
        {
            break sessions;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        sessions
            .iter()
            .any(|(name, _)| name == "mana-sync listener"),
        "the listener is connected: {sessions:?}"
    );
    assert!(sessions.len() >= 2, "pool and listener: {sessions:?}");
    assert!(
        sessions.iter().all(|(_, tls)| *tls),
        "every session of ours uses TLS: {sessions:?}"
    );

    server.stop().await;
    drop(admin);
    cluster.stop().await.expect("the TLS cluster stops");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

// -------------------------------------------------------------------------------------------------------
// Outbound HTTPS: JWKS and billing
// -------------------------------------------------------------------------------------------------------

/// A tiny HTTPS server: answers every request with `respond(path)` = (status line, extra headers, body)
/// and counts the requests that got through the handshake.
struct HttpsStandIn {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl HttpsStandIn {
    async fn start(
        pki: &Pki,
        respond: impl Fn(&str) -> (&'static str, String, String) + Send + Sync + 'static,
    ) -> HttpsStandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
        let respond = Arc::new(respond);
        let counter = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, respond, counter) =
                    (acceptor.clone(), respond.clone(), counter.clone());
                tokio::spawn(async move {
                    // A client that refuses our certificate ends here.
                    let Ok(mut stream) = acceptor.accept(socket).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let (status, headers, body) = respond(&path);
                    let response = format!(
                        "HTTP/1.1 {status}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        HttpsStandIn { addr, hits }
    }

    /// `https://localhost:PORT` (the name in the certificate).
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn jwks_document() -> String {
    std::fs::read_to_string(&keys().jwks_path).unwrap()
}

async fn fetch_jwks(url: &str, tls: OutboundTls) -> Result<usize, String> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        mana_sync::auth::jwks::fetch_jwks_url(&url, Duration::from_secs(5), &tls).map(|k| k.len())
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn jwks_over_https_is_trusted_through_the_ca_file_and_refused_without_it() {
    let pki = pki("jwks");
    let jwks = HttpsStandIn::start(&pki, |_| ("200 OK", String::new(), jwks_document())).await;
    let trusted = OutboundTls::with_ca_file(&pki.ca).unwrap();

    // With the test CA: the real server loads the keys and a token verifies.
    let server = TestServer::start_with(|c| {
        c.jwks_url = Some(jwks.url("/jwks"));
        c.jwks_file = None;
        c.outbound_tls = trusted.clone();
    })
    .await;
    let user = unique_user("jwks-tls");
    let pulled = server.pull(&user, "todo", None, "tasks", EPOCH, None).await;
    assert_eq!(pulled.status, 200, "{}", pulled.text);
    server.stop().await;

    // Without it (web roots only): no key loads, requests get 503 keys_unavailable, and the fetch error
    // says why. A stand-in of its own, so that a late background refresh of the first server cannot
    // count as a hit here.
    let jwks = HttpsStandIn::start(&pki, |_| ("200 OK", String::new(), jwks_document())).await;
    let hits_before = jwks.hits();
    let server = TestServer::start_with(|c| {
        c.jwks_url = Some(jwks.url("/jwks"));
        c.jwks_file = None;
        c.outbound_tls = OutboundTls::web_roots();
    })
    .await;
    let pulled = server.pull(&user, "todo", None, "tasks", EPOCH, None).await;
    assert_eq!(pulled.status, 503, "{}", pulled.text);
    assert!(pulled.text.contains("keys_unavailable"), "{}", pulled.text);
    server.stop().await;
    let error = fetch_jwks(&jwks.url("/jwks"), OutboundTls::web_roots())
        .await
        .expect_err("an unknown CA is refused");
    assert!(error.contains("UnknownIssuer"), "{error}");
    assert_eq!(
        jwks.hits(),
        hits_before,
        "no request got past the handshake"
    );

    // The CA vouches for `localhost` only: the same server under another name is refused.
    let by_address = format!("https://127.0.0.1:{}/jwks", jwks.addr.port());
    let error = fetch_jwks(&by_address, trusted.clone())
        .await
        .expect_err("a certificate for another name is refused");
    assert!(error.contains("not valid for name"), "{error}");
    assert_eq!(fetch_jwks(&jwks.url("/jwks"), trusted).await, Ok(1));
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn a_redirect_over_https_to_another_host_is_not_followed() {
    let pki = pki("redirect");
    let elsewhere = HttpsStandIn::start(&pki, |_| ("200 OK", String::new(), jwks_document())).await;
    let target = elsewhere.url("/jwks");
    let redirecting = HttpsStandIn::start(&pki, move |_| {
        (
            "302 Found",
            format!("Location: {target}\r\n"),
            String::new(),
        )
    })
    .await;
    let trusted = OutboundTls::with_ca_file(&pki.ca).unwrap();

    let error = fetch_jwks(&redirecting.url("/jwks"), trusted.clone())
        .await
        .expect_err("a redirect is an error");
    assert!(error.contains("302"), "{error}");

    // The billing gate treats the redirect as a failure (and fails open) without following it either.
    let server = TestServer::start_with(|c| {
        c.mana_credits_url = Some(redirecting.url(""));
        c.outbound_tls = trusted;
    })
    .await;
    let user = unique_user("billing-redirect");
    let pulled = server.pull(&user, "todo", None, "tasks", EPOCH, None).await;
    assert_eq!(pulled.status, 200, "fails open: {}", pulled.text);
    let billing = server.shared.billing.as_ref().unwrap();
    assert_eq!(billing.stats.failed_open.load(Ordering::Relaxed), 1);
    server.stop().await;
    assert_eq!(redirecting.hits(), 2, "both were asked");
    assert_eq!(elsewhere.hits(), 0, "neither redirect was followed");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn billing_over_https_is_trusted_through_the_ca_file_and_refused_without_it() {
    let pki = pki("billing");
    let credits = HttpsStandIn::start(&pki, |path| {
        assert!(path.starts_with("/api/v1/internal/sync/status/"), "{path}");
        ("200 OK", String::new(), r#"{"active":false}"#.to_owned())
    })
    .await;

    // Trusted: mana-credits is asked and its answer (inactive) holds: 402.
    let server = TestServer::start_with(|c| {
        c.mana_credits_url = Some(credits.url(""));
        c.outbound_tls = OutboundTls::with_ca_file(&pki.ca).unwrap();
    })
    .await;
    let user = unique_user("billing-tls");
    let pulled = server.pull(&user, "todo", None, "tasks", EPOCH, None).await;
    assert_eq!(pulled.status, 402, "{}", pulled.text);
    assert!(pulled.text.contains("sync_inactive"), "{}", pulled.text);
    server.stop().await;
    assert_eq!(credits.hits(), 1);

    // Not trusted: the handshake fails, nothing reaches mana-credits, and the gate fails open (counted).
    let server = TestServer::start_with(|c| {
        c.mana_credits_url = Some(credits.url(""));
        c.outbound_tls = OutboundTls::web_roots();
    })
    .await;
    let pulled = server.pull(&user, "todo", None, "tasks", EPOCH, None).await;
    assert_eq!(pulled.status, 200, "fails open: {}", pulled.text);
    let billing = server.shared.billing.as_ref().unwrap();
    assert_eq!(billing.stats.failed_open.load(Ordering::Relaxed), 1);
    assert_eq!(billing.stats.inactive.load(Ordering::Relaxed), 0);
    server.stop().await;
    assert_eq!(credits.hits(), 1, "no request got past the handshake");
    let _ = std::fs::remove_dir_all(&pki.dir);
}
