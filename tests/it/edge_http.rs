//! Edge hosts (issue 14, items 3 and 4): HTTPS and WSS with a certificate from a test CA, HTTP/2 over TLS
//! (ALPN) and as cleartext h2c, the limits per stream, certificate reload, and drain with HTTP/2.
//!
//! Clients are real: hyper's client connections over tokio-rustls (ALPN chosen each way), tokio-tungstenite
//! over TLS, and for what hyper's client will not do (open more streams than the server allows) a few
//! hand-written HTTP/2 frames.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mana_sync::config::TlsFiles;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::support::{
    changeset, insert, token, unique_user, wait_until, Reply, TestServer, LOG_START,
};

const WAIT: Duration = Duration::from_secs(10);
const H2: &[u8] = b"h2";
const H1: &[u8] = b"http/1.1";

// ---------------------------------------------------------------------------------------------------
// A test CA and server certificates for localhost and 127.0.0.1.

struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mana-sync test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Writes a new server certificate and key into `dir`; returns the files and the leaf's DER.
    fn issue(&self, dir: &Path) -> (TlsFiles, Vec<u8>) {
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        // Written next to the target and renamed, as a certificate manager would.
        let cert_tmp = dir.join("cert.pem.tmp");
        let key_tmp = dir.join("key.pem.tmp");
        std::fs::write(&cert_tmp, cert.pem()).unwrap();
        std::fs::write(&key_tmp, key.serialize_pem()).unwrap();
        std::fs::rename(&key_tmp, &files.key).unwrap();
        std::fs::rename(&cert_tmp, &files.cert).unwrap();
        (files, cert.der().to_vec())
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mana-sync-edge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A server with TLS from a fresh CA; `adjust` changes the rest of its configuration.
async fn tls_server(
    name: &str,
    adjust: impl FnOnce(&mut mana_sync::config::Config),
) -> (TestServer, TestCa, PathBuf) {
    let ca = TestCa::new();
    let dir = scratch_dir(name);
    let (files, _) = ca.issue(&dir);
    let server = TestServer::start_with(|config| {
        config.tls = Some(files);
        adjust(config);
    })
    .await;
    (server, ca, dir)
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn alpn_of(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(|p| p.to_vec())
}

fn leaf_of(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

// ---------------------------------------------------------------------------------------------------
// A client connection over any transport, HTTP/1.1 or HTTP/2.

type RequestBody = UnsyncBoxBody<Bytes, Infallible>;

enum Client {
    H1(hyper::client::conn::http1::SendRequest<RequestBody>),
    H2(hyper::client::conn::http2::SendRequest<RequestBody>),
}

impl Client {
    async fn h1(io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static) -> Client {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection.with_upgrades());
        Client::H1(sender)
    }

    async fn h2(io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static) -> Client {
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        Client::H2(sender)
    }

    /// Connects over TLS offering exactly `alpn`, and speaks what the server chose.
    async fn tls(addr: SocketAddr, ca: &TestCa, alpn: &[u8]) -> Client {
        let stream = tls_connect(addr, ca.client_config(&[alpn]))
            .await
            .expect("TLS handshake");
        assert_eq!(alpn_of(&stream).as_deref(), Some(alpn), "ALPN");
        if alpn == H2 {
            Client::h2(stream).await
        } else {
            Client::h1(stream).await
        }
    }

    fn version(&self) -> Version {
        match self {
            Client::H1(_) => Version::HTTP_11,
            Client::H2(_) => Version::HTTP_2,
        }
    }

    /// Another handle on the same connection (HTTP/2 only: streams share it).
    fn stream_handle(&self) -> Client {
        match self {
            Client::H2(sender) => Client::H2(sender.clone()),
            Client::H1(_) => panic!("an HTTP/1.1 connection carries one request at a time"),
        }
    }

    async fn send(&mut self, request: Request<RequestBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            Client::H1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Client::H2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }

    /// Sends and reads the whole answer; asserts the protocol version it came in.
    async fn call(&mut self, request: Request<RequestBody>) -> Reply {
        let expected = self.version();
        let response = tokio::time::timeout(WAIT, self.send(request))
            .await
            .expect("an answer in time")
            .expect("a response");
        assert_eq!(response.version(), expected);
        read_reply(response).await
    }
}

async fn read_reply(response: Response<Incoming>) -> Reply {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Reply {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text,
    }
}

/// A stream's response when it is 200; otherwise fails showing the status and the (error) body.
async fn ok_stream(response: Response<Incoming>) -> Response<Incoming> {
    if response.status() != 200 {
        let reply = read_reply(response).await;
        panic!("the stream was refused: {} {}", reply.status, reply.text);
    }
    response
}

fn empty() -> RequestBody {
    Empty::new().boxed_unsync()
}

fn full(bytes: Vec<u8>) -> RequestBody {
    Full::new(Bytes::from(bytes)).boxed_unsync()
}

/// A body whose chunks the test sends when it likes (and which never ends if it does not).
fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, RequestBody) {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), receiver))
    });
    (sender, StreamBody::new(stream).boxed_unsync())
}

fn get(path: &str, user: Option<&str>) -> Request<RequestBody> {
    let mut builder = Request::get(format!("https://localhost{path}"));
    if let Some(user) = user {
        builder = builder.header("authorization", format!("Bearer {}", token(user)));
    }
    builder.body(empty()).unwrap()
}

fn push_request(user: &str, device: &str, body: RequestBody) -> Request<RequestBody> {
    Request::post("https://localhost/sync/todo")
        .header("authorization", format!("Bearer {}", token(user)))
        .header("content-type", "application/json")
        .header("x-client-id", device)
        .body(body)
        .unwrap()
}

fn push_of(user: &str, device: &str, id: &str) -> Request<RequestBody> {
    let body = changeset(vec![insert("tasks", id, json!({"title": id}))]);
    push_request(user, device, full(body.to_string().into_bytes()))
}

fn pull_path() -> String {
    format!(
        "/sync/todo/pull?collection=tasks&since={}",
        crate::support::percent_encode(LOG_START)
    )
}

fn pulled_ids(reply: &Reply) -> Vec<String> {
    reply
        .changes()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Reads an open SSE response until a `changes` event mentions `needle`.
async fn sse_until(body: &mut Incoming, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(seen.contains("event: changes") && seen.contains(needle)) {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("no change event with {needle:?}; saw {seen:?}"))
            .expect("the stream is open")
            .expect("a frame");
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    seen
}

// ---------------------------------------------------------------------------------------------------

/// Push, pull, an SSE stream receiving a change, a WSS session receiving a hint and health, over TLS with
/// ALPN choosing HTTP/2 and then HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_push_pull_streams_sockets_and_health_over_h2_and_http1() {
    let (server, ca, dir) = tls_server("both", |_| {}).await;
    for alpn in [H2, H1] {
        let user = unique_user("edge-tls");
        let mut client = Client::tls(server.addr, &ca, alpn).await;

        let health = client.call(get("/health", None)).await;
        assert_eq!(health.status, 200, "{}", health.text);
        assert_eq!(health.body["status"], json!("ok"));

        let pushed = client.call(push_of(&user, "laptop", "t1")).await;
        assert_eq!(pushed.status, 200, "{}", pushed.text);
        let pulled = client.call(get(&pull_path(), Some(&user))).await;
        assert_eq!(pulled.status, 200, "{}", pulled.text);
        assert_eq!(pulled_ids(&pulled), vec!["t1"]);

        // An SSE stream: on HTTP/2 another stream of the same connection, on HTTP/1.1 its own connection.
        let mut streamer = match alpn {
            H2 => client.stream_handle(),
            _ => Client::tls(server.addr, &ca, H1).await,
        };
        let stream_path = format!(
            "/sync/todo/stream?since={}",
            crate::support::percent_encode(LOG_START)
        );
        let response =
            ok_stream(streamer.send(get(&stream_path, Some(&user))).await.unwrap()).await;
        assert_eq!(response.version(), client.version());
        let mut events = response.into_body();
        sse_until(&mut events, "\"t1\"").await; // the backlog

        // A WSS session (always HTTP/1.1: WebSockets are HTTP/1.1 upgrades).
        let tls = tls_connect(server.addr, ca.client_config(&[H1]))
            .await
            .unwrap();
        let (mut socket, _) = tokio_tungstenite::client_async(
            format!("wss://localhost:{}/ws", server.addr.port()),
            tls,
        )
        .await
        .expect("WSS handshake");
        ws_send(
            &mut socket,
            json!({"type": "auth", "token": token(&user), "clientId": "phone"}),
        )
        .await;
        assert_eq!(ws_next(&mut socket).await, json!({"type": "auth-ok"}));

        // Another device pushes (on the first connection, while the stream is open): both hear of it.
        let pushed = client.call(push_of(&user, "tablet", "t2")).await;
        assert_eq!(pushed.status, 200, "{}", pushed.text);
        sse_until(&mut events, "\"t2\"").await;
        assert_eq!(
            ws_next(&mut socket).await,
            json!({"type": "sync-available", "appId": "todo", "tables": ["tasks"]})
        );
        // The server says what it speaks: the request went over the negotiated protocol.
        let pulled = client.call(get(&pull_path(), Some(&user))).await;
        assert_eq!(pulled_ids(&pulled), vec!["t1", "t2"]);
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

type TlsSocket = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

async fn ws_send(socket: &mut TlsSocket, value: Value) {
    use futures_util::SinkExt;
    socket
        .send(tokio_tungstenite::tungstenite::Message::text(
            value.to_string(),
        ))
        .await
        .unwrap();
}

async fn ws_next(socket: &mut TlsSocket) -> Value {
    use futures_util::StreamExt;
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("a frame");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// Plain port, HTTP/2 with prior knowledge (h2c): what a proxy speaking HTTP/2 upstream does. HTTP/1.1 on
/// the same port still works, and the WebSocket endpoints say that they need an HTTP/1.1 upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_on_the_plain_port() {
    let server = TestServer::start().await;
    let user = unique_user("edge-h2c");
    let mut client = Client::h2(TcpStream::connect(server.addr).await.unwrap()).await;
    let pushed = client.call(push_of(&user, "laptop", "t1")).await;
    assert_eq!(pushed.status, 200, "{}", pushed.text);
    let pulled = client.call(get(&pull_path(), Some(&user))).await;
    assert_eq!(pulled.status, 200, "{}", pulled.text);
    assert_eq!(pulled_ids(&pulled), vec!["t1"]);
    let socket = client.call(get("/ws", None)).await;
    socket.assert_error(426, "upgrade_required");

    let mut plain = Client::h1(TcpStream::connect(server.addr).await.unwrap()).await;
    let pulled = plain.call(get(&pull_path(), Some(&user))).await;
    assert_eq!(pulled_ids(&pulled), vec!["t1"]);
    server.stop().await;
}

/// An HTTP/2 connection whose only stream is an open SSE stream is in use, not idle: the idle timeout does
/// not close it under the stream, and other requests keep sharing it. Once the stream ends, it idles out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_keeps_its_http2_connection_from_idling_out() {
    let server = TestServer::start_with(|c| c.idle_timeout = Duration::from_millis(300)).await;
    let user = unique_user("edge-idle");
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let mut client = Client::H2(sender);
    let stream_path = format!(
        "/sync/todo/stream?since={}",
        crate::support::percent_encode(LOG_START)
    );
    let response = ok_stream(client.send(get(&stream_path, Some(&user))).await.unwrap()).await;
    let mut events = response.into_body();
    // Longer than the idle timeout (300 ms) with only the stream open.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pushed = client.call(push_of(&user, "laptop", "t1")).await;
    assert_eq!(pushed.status, 200, "{}", pushed.text);
    sse_until(&mut events, "\"t1\"").await;
    drop(events);
    // Nothing in flight now: the server closes the connection (GOAWAY) after the idle timeout.
    tokio::time::timeout(WAIT, connection)
        .await
        .expect("the idle connection was closed")
        .unwrap()
        .unwrap();
    server.stop().await;
}

/// Fifty streams at once over one HTTP/2 connection all succeed. With the per-user cap scaled down, the
/// user's requests are counted per stream (429 past the cap) while another user's streams on the same
/// connection are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_over_one_connection_and_per_user_caps_count_streams() {
    let (server, ca, dir) = tls_server("many", |_| {}).await;
    let user = unique_user("edge-many");
    let client = Client::tls(server.addr, &ca, H2).await;
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let mut stream = client.stream_handle();
            let user = user.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    stream
                        .call(push_of(&user, "laptop", &format!("t{i}")))
                        .await
                } else {
                    stream.call(get(&pull_path(), Some(&user))).await
                }
            })
        })
        .collect();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let pulled = client
        .stream_handle()
        .call(get(&pull_path(), Some(&user)))
        .await;
    assert_eq!(pulled_ids(&pulled).len(), 25, "{}", pulled.text);
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);

    // MAX_REQUESTS_PER_USER=10: fifty pushes whose bodies never arrive hold ten slots; forty get 429.
    let (server, ca, dir) = tls_server("per-user", |c| c.max_requests_per_user = 10).await;
    let client = Client::tls(server.addr, &ca, H2).await;
    let greedy = unique_user("edge-greedy");
    let mut bodies = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..50 {
        let (sender, body) = channel_body();
        bodies.push(sender);
        let mut stream = client.stream_handle();
        let request = push_request(&greedy, "laptop", body);
        pending.push(tokio::spawn(async move {
            let response = stream.send(request).await.unwrap();
            read_reply(response).await
        }));
    }
    let mut refused = 0;
    let started = Instant::now();
    while refused < 40 && started.elapsed() < WAIT {
        let mut still = Vec::new();
        for task in pending {
            if task.is_finished() {
                task.await.unwrap().assert_error(429, "too_many_requests");
                refused += 1;
            } else {
                still.push(task);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refused, 40, "all but MAX_REQUESTS_PER_USER streams refused");
    assert_eq!(pending.len(), 10);
    // Another user on the same connection is unaffected.
    let other = unique_user("edge-other");
    let mut stream = client.stream_handle();
    let reply = stream.call(push_of(&other, "phone", "o1")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    // The ten held streams finish when their bodies come.
    let body = changeset(vec![insert("tasks", "g", json!({}))]).to_string();
    for sender in bodies.iter().filter(|s| !s.is_closed()) {
        sender.send(Bytes::from(body.clone())).await.unwrap();
    }
    drop(bodies);
    for task in pending {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// New certificate files on disk: a connection that is open keeps working on its session, a new one is
/// served the new certificate (the reload checks every 100 ms here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_is_served_to_new_connections_without_dropping_open_ones() {
    let ca = TestCa::new();
    let dir = scratch_dir("swap");
    let (files, first_leaf) = ca.issue(&dir);
    let server = TestServer::start_with(|config| {
        config.tls = Some(files);
        config.tls_reload_interval = Duration::from_millis(100);
    })
    .await;
    let open = tls_connect(server.addr, ca.client_config(&[H2]))
        .await
        .unwrap();
    assert_eq!(leaf_of(&open), first_leaf);
    let mut open = Client::h2(open).await;
    open.call(get("/health", None)).await.assert_status(200);

    let (_, second_leaf) = ca.issue(&dir);
    assert_ne!(first_leaf, second_leaf);
    let deadline = Instant::now() + WAIT;
    loop {
        let fresh = tls_connect(server.addr, ca.client_config(&[H2]))
            .await
            .unwrap();
        if leaf_of(&fresh) == second_leaf {
            let mut fresh = Client::h2(fresh).await;
            fresh.call(get("/health", None)).await.assert_status(200);
            break;
        }
        assert_eq!(leaf_of(&fresh), first_leaf);
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection from before the swap is still served.
    let user = unique_user("edge-swap");
    let reply = open.call(push_of(&user, "laptop", "t1")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // Files that cannot be used keep the certificate in use.
    std::fs::write(dir.join("cert.pem"), "-----BEGIN CERTIFICATE-----\nnot one").unwrap();
    // Several periodic checks (every 100 ms) see the bad files: a non-event, nothing to wait for.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = tls_connect(server.addr, ca.client_config(&[H2]))
        .await
        .expect("still served after a bad reload");
    assert_eq!(leaf_of(&fresh), second_leaf);
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The real binary: with the periodic check far off, new files are not served until SIGHUP, and then at
/// once. (In a process of its own: a SIGHUP handler installed in the test binary would outlive the test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_of_the_running_binary() {
    let ca = TestCa::new();
    let dir = scratch_dir("sighup");
    let (files, first_leaf) = ca.issue(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mana-sync"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", &crate::support::cluster().conn_string)
        .env("JWKS_URL", "")
        .env("JWKS_FILE", &crate::support::keys().jwks_path)
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("LOG_LEVEL", "warn")
        .env("TLS_CERT_FILE", &files.cert)
        .env("TLS_KEY_FILE", &files.key)
        .env("TLS_RELOAD_INTERVAL_MS", "3600000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    // Killed if the test fails half-way (otherwise it would outlive the test binary).
    let mut child = KillOnDrop(child);
    let leaf_now = || async {
        let stream = tls_connect(addr, ca.client_config(&[H2])).await.ok()?;
        Some(leaf_of(&stream))
    };
    wait_until("the binary serves TLS", Duration::from_secs(30), || async {
        leaf_now().await.is_some()
    })
    .await;
    assert_eq!(leaf_now().await, Some(first_leaf.clone()));
    // The container HEALTHCHECK: with TLS configured it asks the HTTPS port (plain HTTP would fail).
    let healthcheck = |tls: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mana-sync"));
        command
            .arg("healthcheck")
            .env_clear()
            .env("PORT", port.to_string());
        if tls {
            command
                .env("TLS_CERT_FILE", &files.cert)
                .env("TLS_KEY_FILE", &files.key);
        }
        command.output().unwrap()
    };
    let checked = healthcheck(true);
    assert!(checked.status.success(), "{checked:?}");
    let checked = healthcheck(false);
    assert!(
        !checked.status.success(),
        "plain HTTP to the TLS port: {checked:?}"
    );
    let (_, second_leaf) = ca.issue(&dir);
    // Time for a wrong reload to happen, if one would (a non-event: nothing to wait for).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        leaf_now().await,
        Some(first_leaf),
        "no reload before SIGHUP (the periodic check is an hour away)"
    );
    let signal = |name: &str| {
        std::process::Command::new("kill")
            .args([name, pid.as_str()])
            .status()
            .unwrap()
    };
    assert!(signal("-HUP").success());
    wait_until("SIGHUP reloads", WAIT, || async {
        leaf_now().await.as_ref() == Some(&second_leaf)
    })
    .await;
    assert!(signal("-TERM").success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A child process that is killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A TLS server refuses clients that do not trust its CA, and a plain-HTTP request to it is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_clients_and_plain_http_get_nothing_from_a_tls_port() {
    let (server, _ca, dir) = tls_server("untrusted", |_| {}).await;
    let stranger = TestCa::new();
    assert!(tls_connect(server.addr, stranger.client_config(&[H2]))
        .await
        .is_err());
    let reply = crate::support::try_request("GET", &server.url("/health"), &[], None).await;
    assert!(
        reply.is_err(),
        "plain HTTP answered on the TLS port: {reply:?}"
    );
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------------------
// Limits, per stream.

/// Over HTTP/2 a header block over HTTP2_MAX_HEADER_LIST_BYTES is refused with 431; one under it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_http2_header_list_is_refused() {
    let server = TestServer::start_with(|c| c.http2_max_header_list_bytes = 4096).await;
    let mut client = Client::h2(TcpStream::connect(server.addr).await.unwrap()).await;
    let padded = |size: usize| {
        Request::get("http://localhost/health")
            .header("x-padding", "a".repeat(size))
            .body(empty())
            .unwrap()
    };
    client.call(padded(2000)).await.assert_status(200);
    client.call(padded(8000)).await.assert_status(431);
    // The connection survives: the refusal is per stream.
    client.call(padded(10)).await.assert_status(200);
    server.stop().await;

    // The default (16 KiB) holds too.
    let server = TestServer::start().await;
    let mut client = Client::h2(TcpStream::connect(server.addr).await.unwrap()).await;
    client.call(padded(8000)).await.assert_status(200);
    client.call(padded(20_000)).await.assert_status(431);
    server.stop().await;
}

/// The body cap holds per stream: a declared length over MAX_BODY_BYTES and a body that grows past it
/// (no length) are both 413 with the JSON error, and the connection's other streams go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_cap_holds_per_http2_stream() {
    let server = TestServer::start_with(|c| {
        c.max_body_bytes = 64 * 1024;
        c.max_inflight_body_bytes = 1024 * 1024;
    })
    .await;
    let user = unique_user("edge-cap");
    let mut client = Client::h2(TcpStream::connect(server.addr).await.unwrap()).await;
    let big = vec![b' '; 100 * 1024];
    // Declared: hyper's client sends the length of a full body.
    let reply = client
        .call(push_request(&user, "laptop", full(big.clone())))
        .await;
    reply.assert_error(413, "payload_too_large");
    // Streamed without a length, in 16 KiB pieces.
    let (sender, body) = channel_body();
    let mut stream = client.stream_handle();
    let request = push_request(&user, "laptop", body);
    let answer = tokio::spawn(async move { read_reply(stream.send(request).await.unwrap()).await });
    for chunk in big.chunks(16 * 1024) {
        if sender.send(Bytes::copy_from_slice(chunk)).await.is_err() {
            break;
        }
    }
    drop(sender);
    answer.await.unwrap().assert_error(413, "payload_too_large");
    // The connection goes on; a body under the cap is served.
    let reply = client.call(push_of(&user, "laptop", "t1")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    server.stop().await;
}

/// A slow body over HTTP/2 hits BODY_READ_TIMEOUT_MS with the same JSON error as over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_http2_body_times_out_like_an_http1_one() {
    let (server, ca, dir) =
        tls_server("slow", |c| c.body_read_timeout = Duration::from_millis(500)).await;
    let user = unique_user("edge-slow");
    for alpn in [H2, H1] {
        let mut client = Client::tls(server.addr, &ca, alpn).await;
        let (sender, body) = channel_body();
        sender
            .send(Bytes::from_static(b"{\"since\":"))
            .await
            .unwrap();
        let started = Instant::now();
        let reply = client.call(push_request(&user, "laptop", body)).await;
        reply.assert_error(408, "body_timeout");
        assert!(started.elapsed() >= Duration::from_millis(450));
        drop(sender);
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// SETTINGS_MAX_CONCURRENT_STREAMS is advertised, and a client that opens more streams than that gets the
/// extra ones refused (REFUSED_STREAM) while the others stay open; closing one makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_concurrent_stream_cap_are_refused() {
    let server = TestServer::start_with(|c| c.http2_max_concurrent_streams = 4).await;
    let user = unique_user("edge-streams");
    let auth = format!("Bearer {}", token(&user));
    let mut raw = RawH2::connect(server.addr).await;
    let settings = raw.server_settings().await;
    assert!(
        settings.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 4)),
        "{settings:?}"
    );
    // Five pushes whose bodies never come.
    let push = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/sync/todo"),
        (":authority", "localhost"),
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    for id in [1, 3, 5, 7, 9] {
        raw.headers(id, &push, false).await;
    }
    let (id, code) = raw.next_reset(WAIT).await.expect("a refused stream");
    assert_eq!((id, code), (9, REFUSED_STREAM));
    assert_eq!(raw.next_reset(Duration::from_millis(300)).await, None);
    // The client gives up one stream; a new one is served.
    raw.reset(1, CANCEL).await;
    let health = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/health"),
        (":authority", "localhost"),
    ];
    raw.headers(11, &health, true).await;
    let frame = raw.next_on_stream(11, WAIT).await.expect("an answer");
    assert_eq!(frame.kind, FRAME_HEADERS, "{frame:?}");
    server.stop().await;
}

/// A client that opens TCP and never starts the TLS handshake holds its connection slot only until the
/// header read timeout; with MAX_CONNECTIONS=1 the next client waits for it and is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_client_is_dropped_at_the_handshake_deadline_and_frees_its_slot() {
    let (server, ca, dir) = tls_server("silent", |c| {
        c.max_connections = 1;
        c.header_read_timeout = Duration::from_millis(800);
    })
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    wait_until("the silent client is accepted", WAIT, || async {
        server.shared.open_connections() == 1
    })
    .await;
    let waiting = tokio::spawn({
        let addr = server.addr;
        let config = ca.client_config(&[H2]);
        async move {
            let stream = tls_connect(addr, config).await.unwrap();
            let mut client = Client::h2(stream).await;
            (client.call(get("/health", None)).await, Instant::now())
        }
    });
    // Half the handshake deadline: the waiting client must not be served yet.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !waiting.is_finished(),
        "the silent client holds the only slot"
    );
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buffer))
        .await
        .expect("the silent connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(700) && closed_after < Duration::from_secs(5),
        "closed after {closed_after:?}"
    );
    let (reply, served_at) = waiting.await.unwrap();
    reply.assert_status(200);
    assert!(served_at.duration_since(started) >= Duration::from_millis(700));
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Shutdown with an open HTTP/2 connection: the stream in flight finishes, new streams are refused
/// (GOAWAY), the connection closes and the server stops well within its drain time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_http2_streams_in_flight_and_refuses_new_ones() {
    let server = TestServer::start().await;
    let user = unique_user("edge-drain");
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let mut client = Client::H2(sender);
    client.call(get("/health", None)).await.assert_status(200);

    let (body_sender, body) = channel_body();
    let mut stream = client.stream_handle();
    let in_flight = tokio::spawn({
        let request = push_request(&user, "laptop", body);
        async move { read_reply(stream.send(request).await.unwrap()).await }
    });
    let permits = server.shared.config.max_concurrent_requests;
    wait_until("the push is in flight", WAIT, || async {
        server.shared.request_permits.available_permits() < permits
    })
    .await;
    let stopping = tokio::spawn(server.stop());
    // Stopping must wait for the stream: it has not finished a while later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stopping.is_finished(), "the server waits for the stream");
    let refused = tokio::time::timeout(WAIT, client.send(get("/health", None))).await;
    assert!(
        matches!(refused, Ok(Err(_))),
        "a new stream after GOAWAY: {refused:?}"
    );
    let body = changeset(vec![insert("tasks", "t1", json!({}))]).to_string();
    body_sender.send(Bytes::from(body)).await.unwrap();
    drop(body_sender);
    let reply = tokio::time::timeout(WAIT, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    tokio::time::timeout(Duration::from_secs(4), stopping)
        .await
        .expect("stopped within the drain time")
        .unwrap();
    tokio::time::timeout(WAIT, connection)
        .await
        .expect("the connection closed")
        .unwrap()
        .expect("closed cleanly");
}

// ---------------------------------------------------------------------------------------------------
// Just enough HTTP/2 by hand to do what well-behaved clients never do.

const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_CONTINUATION: u8 = 0x9;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;

#[derive(Debug)]
struct RawFrame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

struct RawH2 {
    stream: TcpStream,
}

impl RawH2 {
    async fn connect(addr: SocketAddr) -> RawH2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut raw = RawH2 { stream };
        raw.send(FRAME_SETTINGS, 0, 0, &[]).await;
        raw
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await.unwrap();
    }

    async fn read(&mut self, wait: Duration) -> Option<RawFrame> {
        let mut head = [0u8; 9];
        tokio::time::timeout(wait, self.stream.read_exact(&mut head))
            .await
            .ok()?
            .ok()?;
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; length];
        self.stream.read_exact(&mut payload).await.ok()?;
        let frame = RawFrame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        };
        if frame.kind == FRAME_SETTINGS && frame.flags & 1 == 0 {
            self.send(FRAME_SETTINGS, 1, 0, &[]).await;
        }
        Some(frame)
    }

    /// The server's SETTINGS as (identifier, value) pairs (acknowledged).
    async fn server_settings(&mut self) -> Vec<(u16, u32)> {
        loop {
            let frame = self.read(WAIT).await.expect("the server's SETTINGS");
            if frame.kind == FRAME_SETTINGS && frame.flags & 1 == 0 {
                return frame
                    .payload
                    .chunks(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
            }
        }
    }

    /// A header block as literals without indexing (no Huffman), split into CONTINUATION frames if long.
    async fn headers(&mut self, stream: u32, fields: &[(&str, &str)], end_stream: bool) {
        let mut block = Vec::new();
        for (name, value) in fields {
            block.push(0);
            hpack_string(&mut block, name.as_bytes());
            hpack_string(&mut block, value.as_bytes());
        }
        let chunks: Vec<&[u8]> = block.chunks(16_000).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let mut flags = if last { 0x4 } else { 0 };
            let kind = if i == 0 {
                if end_stream {
                    flags |= 0x1;
                }
                FRAME_HEADERS
            } else {
                FRAME_CONTINUATION
            };
            self.send(kind, flags, stream, chunk).await;
        }
    }

    async fn reset(&mut self, stream: u32, code: u32) {
        self.send(FRAME_RST_STREAM, 0, stream, &code.to_be_bytes())
            .await;
    }

    /// The next RST_STREAM within `wait`, as (stream, error code).
    async fn next_reset(&mut self, wait: Duration) -> Option<(u32, u32)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.read(left).await?;
            if frame.kind == FRAME_RST_STREAM {
                let code = u32::from_be_bytes(frame.payload[..4].try_into().unwrap());
                return Some((frame.stream, code));
            }
        }
    }

    async fn next_on_stream(&mut self, stream: u32, wait: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.read(left).await?;
            if frame.stream == stream {
                return Some(frame);
            }
        }
    }
}

/// An HPACK string literal: length with a 7-bit prefix (RFC 7541 §5.1), then the bytes.
fn hpack_string(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut length = bytes.len();
    if length < 127 {
        out.push(length as u8);
    } else {
        out.push(127);
        length -= 127;
        while length >= 128 {
            out.push((length % 128) as u8 | 0x80);
            length /= 128;
        }
        out.push(length as u8);
    }
    out.extend_from_slice(bytes);
}
