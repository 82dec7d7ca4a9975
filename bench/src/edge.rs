//! Scenario `tls` (issue 14): the cost of TLS and of HTTP/2 on the hot path, in the same run.
//!
//! Two in-process servers on the same cluster, one plain and one with a self-signed certificate (ECDSA
//! P-256, rcgen's default). For each transport — plain HTTP/1.1, HTTPS HTTP/1.1, h2c, HTTPS HTTP/2 — C
//! devices (one keep-alive connection each, one request at a time, each its own user) run a closed loop
//! of pushes of one change, then a closed loop of empty pulls (`since` = the device's newest
//! `syncedUntil`, its own client id, so every answer is empty). Connections are opened before the window:
//! handshakes are not measured, only the per-request cost of encryption and framing. The order of the
//! transports rotates per run; figures are medians over runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mana_sync::config::TlsFiles;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::common::*;
use crate::hist::{ms, Histogram};

pub struct Args {
    pub runs: usize,
    pub connections: usize,
    pub warm: Duration,
    pub dur: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    PlainH1,
    TlsH1,
    H2c,
    TlsH2,
}

impl Transport {
    const ALL: [Transport; 4] = [
        Transport::PlainH1,
        Transport::TlsH1,
        Transport::H2c,
        Transport::TlsH2,
    ];

    fn label(self) -> &'static str {
        match self {
            Transport::PlainH1 => "plain HTTP/1.1",
            Transport::TlsH1 => "TLS HTTP/1.1",
            Transport::H2c => "h2c",
            Transport::TlsH2 => "TLS HTTP/2",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Transport::TlsH1 | Transport::TlsH2)
    }

    fn h2(self) -> bool {
        matches!(self, Transport::H2c | Transport::TlsH2)
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

struct Device {
    sender: Sender,
    token: String,
    id: String,
    since: String,
    seq: u64,
}

async fn handshake(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    h2: bool,
) -> Result<Sender> {
    if h2 {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
        tokio::spawn(conn);
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        Ok(Sender::H1(sender))
    }
}

impl Device {
    async fn connect(
        transport: Transport,
        addr: SocketAddr,
        tls: &Arc<rustls::ClientConfig>,
        token: String,
        id: String,
    ) -> Result<Device> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let sender = if transport.tls() {
            let mut config = (**tls).clone();
            config.alpn_protocols = vec![if transport.h2() {
                b"h2".to_vec()
            } else {
                b"http/1.1".to_vec()
            }];
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
                .await?;
            handshake(stream, transport.h2()).await?
        } else {
            handshake(tcp, transport.h2()).await?
        };
        Ok(Device {
            sender,
            token,
            id,
            since: LOG_START.to_owned(),
            seq: 0,
        })
    }

    async fn send(&mut self, request: hyper::Request<Full<Bytes>>) -> Result<(u16, Bytes)> {
        let response = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(request).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(request).await?
            }
        };
        let status = response.status().as_u16();
        Ok((status, response.into_body().collect().await?.to_bytes()))
    }

    async fn push(&mut self) -> Result<()> {
        let body = crate::push::body(&self.id, &self.since, &mut self.seq, 1);
        let request = hyper::Request::post("https://localhost/sync/todo")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .header("x-client-id", &self.id)
            .body(Full::new(body))?;
        let (status, body) = self.send(request).await?;
        if status != 200 {
            return Err(err(format!("push answered {status}")));
        }
        self.since = synced_until(&body).ok_or_else(|| err("push without syncedUntil"))?;
        Ok(())
    }

    async fn empty_pull(&mut self) -> Result<()> {
        let path = format!(
            "https://localhost/sync/todo/pull?collection=tasks&since={}",
            percent_encode(&self.since)
        );
        let request = hyper::Request::get(path)
            .header("authorization", format!("Bearer {}", self.token))
            .header("x-client-id", &self.id)
            .body(Full::new(Bytes::new()))?;
        let (status, body) = self.send(request).await?;
        let needle: &[u8] = b"\"serverChanges\":[]";
        if status != 200 || !body.windows(needle.len()).any(|w| w == needle) {
            return Err(err(format!(
                "empty pull answered {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(())
    }
}

/// Which measurement: a transport, and pushes (`true`) or empty pulls.
type Which = (Transport, bool);
/// One run's requests/s, p50 and p99 in milliseconds.
type Figure = (f64, f64, f64);

/// Requests/s and latency of one closed loop.
struct Cell {
    rate: f64,
    hist: Histogram,
}

async fn closed_loop(devices: &mut [Device], push: bool, window: Window) -> Result<Cell> {
    let tasks: Vec<_> = devices
        .iter_mut()
        .map(|device| async move {
            let mut hist = Histogram::new();
            let mut done = 0u64;
            tokio::time::sleep_until(window.start.into()).await;
            loop {
                let started = Instant::now();
                if started >= window.end {
                    break;
                }
                if push {
                    device.push().await?;
                } else {
                    device.empty_pull().await?;
                }
                let finished = Instant::now();
                if window.counts(finished) {
                    done += 1;
                    hist.record_duration(finished - started);
                }
            }
            Ok::<_, BoxError>((done, hist))
        })
        .collect();
    let mut total = 0u64;
    let mut hist = Histogram::new();
    for outcome in futures_util::future::join_all(tasks).await {
        let (done, h) = outcome?;
        total += done;
        hist.merge(&h);
    }
    Ok(Cell {
        rate: total as f64 / window.measured().as_secs_f64(),
        hist,
    })
}

pub async fn run(args: Args, results: &mut Results) -> Result<()> {
    println!(
        "\n== tls: push of 1 and empty pull over plain vs TLS, HTTP/1.1 vs HTTP/2 ({} connections, {} cores) ==",
        args.connections,
        num_cpus()
    );
    let cluster = Cluster::start(false).await?;
    let keys = Keys::create()?;
    let dir = std::env::temp_dir().join(format!("msb-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, certified.cert.pem())?;
    std::fs::write(&files.key, certified.signing_key.serialize_pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone())?;
    let client_tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );

    let plain = InProcess::start(&cluster, &keys).await?;
    let tls = InProcess::start_with(&cluster, &keys, |c| c.tls = Some(files.clone())).await?;

    let mut figures: Vec<(Which, Vec<Figure>)> = Vec::new();
    for run in 0..args.runs {
        let mut order = Transport::ALL.to_vec();
        order.rotate_left(run % Transport::ALL.len());
        for transport in order {
            let addr = if transport.tls() {
                tls.addr
            } else {
                plain.addr
            };
            let mut devices = Vec::with_capacity(args.connections);
            for d in 0..args.connections {
                let id = format!(
                    "tls-{run}-{}-{d}",
                    transport.label().replace([' ', '/'], "")
                );
                let token = keys.token(&id);
                devices.push(Device::connect(transport, addr, &client_tls, token, id).await?);
            }
            for push in [true, false] {
                let window = Window::starting_soon(args.warm, args.dur);
                let cell = closed_loop(&mut devices, push, window).await?;
                let entry = (
                    cell.rate,
                    ms(cell.hist.quantile(0.5)),
                    ms(cell.hist.quantile(0.99)),
                );
                results.write(
                    "tls",
                    if push { "push1" } else { "empty_pull" },
                    json!({"run": run, "transport": transport.label(), "connections": args.connections,
                           "rate": cell.rate, "latency": cell.hist.summary_ms()}),
                );
                match figures.iter_mut().find(|(k, _)| *k == (transport, push)) {
                    Some((_, v)) => v.push(entry),
                    None => figures.push(((transport, push), vec![entry])),
                }
            }
        }
    }

    for push in [true, false] {
        println!(
            "\n{}: median of {} runs",
            if push {
                "push of 1 change"
            } else {
                "empty pull"
            },
            args.runs
        );
        println!(
            "{:<16} {:>10} {:>9} {:>9} {:>14}",
            "transport", "req/s", "p50 ms", "p99 ms", "req/s vs plain"
        );
        let median_of = |t: Transport, f: fn(&Figure) -> f64| {
            figures
                .iter()
                .find(|(k, _)| *k == (t, push))
                .map(|(_, v)| median(&v.iter().map(f).collect::<Vec<_>>()))
                .unwrap_or(f64::NAN)
        };
        let base = median_of(Transport::PlainH1, |e| e.0);
        for t in Transport::ALL {
            let rate = median_of(t, |e| e.0);
            println!(
                "{:<16} {:>10.0} {:>9.2} {:>9.2} {:>14.2}",
                t.label(),
                rate,
                median_of(t, |e| e.1),
                median_of(t, |e| e.2),
                rate / base
            );
        }
    }
    plain.stop().await;
    tls.stop().await;
    cluster.stop().await;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
