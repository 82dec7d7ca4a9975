//! TLS for the connections this server opens: to PostgreSQL (`sslmode` and `sslrootcert` in `DATABASE_URL`,
//! with libpq's meanings) and to the JWKS and billing services over `https://` (the built-in web roots plus
//! an optional CA file, `MANA_CA_FILE`).
//!
//! Pure Rust (rustls with the ring provider): the static musl binary needs no system TLS library and no
//! certificate store on disk. TLS for our own clients is `server_tls`'s business.
//!
//! tokio-postgres reads only `sslmode=disable|prefer|require` and knows no `sslrootcert`, so
//! [`DatabaseConfig`] takes both out of the connection string first, gives tokio-postgres the mode it
//! understands (`verify-ca` and `verify-full` negotiate like `require`), and hands the verification to
//! [`PgTls`], our `MakeTlsConnect`.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::Host;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::Socket;

mod database_url;
mod verify;

#[cfg(test)]
use database_url::split_ssl_settings;
pub use database_url::DatabaseConfig;
pub(crate) use database_url::{RootCert, SslMode, SslSettings};

/// The one crypto provider of this crate (ring; never aws-lc-rs, which needs cmake and a C toolchain).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every PEM certificate in `path` and checks each can serve as a trust anchor.
pub(crate) fn read_ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    let (_, unusable) =
        RootCertStore::empty().add_parsable_certificates(certificates.iter().cloned());
    if unusable > 0 {
        return Err(format!(
            "{}: {unusable} of its certificates cannot be used as a CA certificate",
            path.display()
        ));
    }
    Ok(certificates)
}

// ---------------------------------------------------------------------------------------------------------
// Outbound HTTPS (ureq)
// ---------------------------------------------------------------------------------------------------------

/// The roots `https://` fetches (JWKS, billing) are verified against: Mozilla's (built in, from
/// webpki-root-certs) plus the certificates of an optional CA file. The host name is always checked.
#[derive(Clone)]
pub struct OutboundTls {
    tls: ureq::tls::TlsConfig,
    ca_file: Option<PathBuf>,
}

impl OutboundTls {
    /// The built-in web roots only.
    pub fn web_roots() -> OutboundTls {
        OutboundTls::build(Vec::new(), None)
    }

    /// The built-in web roots and the certificates in `ca_file` (PEM).
    pub fn with_ca_file(ca_file: &Path) -> Result<OutboundTls, String> {
        let extra = read_ca_certificates(ca_file)?;
        Ok(OutboundTls::build(extra, Some(ca_file.to_owned())))
    }

    fn build(extra: Vec<CertificateDer<'static>>, ca_file: Option<PathBuf>) -> OutboundTls {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        let web = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|der| Certificate::from_der(der.as_ref()));
        let ours = extra
            .iter()
            .map(|der| Certificate::from_der(der.as_ref()).to_owned());
        let roots: Vec<Certificate<'static>> = web.chain(ours).collect();
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(crypto_provider())
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .build();
        OutboundTls { tls, ca_file }
    }

    /// The TLS settings for a ureq agent.
    pub fn ureq(&self) -> ureq::tls::TlsConfig {
        self.tls.clone()
    }
}

impl Default for OutboundTls {
    fn default() -> OutboundTls {
        OutboundTls::web_roots()
    }
}

impl fmt::Debug for OutboundTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundTls")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------------------
// PostgreSQL: the connector
// ---------------------------------------------------------------------------------------------------------

/// The TLS of our PostgreSQL connections (pool and dedicated ones alike): a tokio-postgres
/// `MakeTlsConnect` over rustls that verifies as the `sslmode` asks.
#[derive(Clone)]
pub struct PgTls {
    /// The mode in effect (`disable` for Unix sockets, whatever was written).
    mode: SslMode,
    /// `None` when TLS is never used.
    config: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl PgTls {
    /// No TLS at all.
    pub(crate) fn disabled() -> PgTls {
        PgTls {
            mode: SslMode::Disable,
            config: None,
        }
    }

    /// The mode in effect.
    #[cfg(test)]
    pub(crate) fn mode(&self) -> SslMode {
        self.mode
    }

    fn new(settings: &SslSettings, hosts: &[Host]) -> Result<PgTls, String> {
        let mode = effective_mode(settings)?;
        // As libpq: TLS is never used over a Unix socket (PostgreSQL refuses it there anyway).
        #[cfg(unix)]
        let unix = |host: &Host| matches!(host, Host::Unix(_));
        #[cfg(not(unix))]
        let unix = |_: &Host| false;
        let sockets = hosts.iter().filter(|host| unix(host)).count();
        if mode == SslMode::Disable || (sockets > 0 && sockets == hosts.len()) {
            return Ok(PgTls::disabled());
        }
        if sockets > 0 && mode != SslMode::Prefer {
            return Err(format!(
                "sslmode={} cannot be used with a host list that mixes Unix sockets and TCP hosts \
                 (TLS is never used over a socket)",
                mode.as_str()
            ));
        }

        let provider = crypto_provider();
        let roots = root_store(settings.root_cert.as_ref())?;
        let verifier = verify::verifier(mode, roots, provider.clone())?;
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(PgTls {
            mode,
            config: Some(Arc::new(config)),
        })
    }
}

/// The mode `settings` ask for, with libpq's defaults.
fn effective_mode(settings: &SslSettings) -> Result<SslMode, String> {
    let system = settings.root_cert == Some(RootCert::System);
    match settings.mode {
        // libpq 16: `sslrootcert=system` makes `verify-full` the default and refuses anything weaker,
        // since public roots vouch for names, not for a particular server.
        None if system => Ok(SslMode::VerifyFull),
        None => Ok(SslMode::Prefer),
        Some(mode) if system && mode != SslMode::VerifyFull => Err(format!(
            "sslmode={} cannot be used with sslrootcert=system: use sslmode=verify-full",
            mode.as_str()
        )),
        Some(mode) => Ok(mode),
    }
}

/// The trust anchors `sslrootcert` names, if any.
fn root_store(root_cert: Option<&RootCert>) -> Result<Option<Arc<RootCertStore>>, String> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        None => return Ok(None),
        Some(RootCert::System) => {
            roots.add_parsable_certificates(
                webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned(),
            );
        }
        Some(RootCert::File(path)) => {
            roots.add_parsable_certificates(
                read_ca_certificates(path).map_err(|e| format!("sslrootcert: {e}"))?,
            );
        }
    }
    Ok(Some(Arc::new(roots)))
}

/// The server's TLS was refused: its certificate failed verification, or the handshake itself failed
/// (no common protocol version or cipher, a bad signature). Retrying does not help; the configuration (or
/// the server's certificate) must change. I/O failures during the handshake are passed on as
/// `std::io::Error` instead, which the store treats as "unavailable, retry later".
#[derive(Debug)]
pub(crate) struct TlsRefused(rustls::Error);

impl TlsRefused {
    /// True when `error` (from connecting) is a TLS refusal.
    pub(crate) fn is_cause_of(error: &tokio_postgres::Error) -> bool {
        StdError::source(error).is_some_and(|source| source.is::<TlsRefused>())
    }
}

impl fmt::Display for TlsRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS with the database refused: {}", self.0)
    }
}

impl StdError for TlsRefused {}

type BoxError = Box<dyn StdError + Send + Sync>;

impl MakeTlsConnect<Socket> for PgTls {
    type Stream = PgTlsStream;
    type TlsConnect = PgTlsConnect;
    type Error = BoxError;

    fn make_tls_connect(&mut self, host: &str) -> Result<PgTlsConnect, BoxError> {
        let name = match ServerName::try_from(host.to_owned()) {
            Ok(name) => name,
            Err(e) if self.mode == SslMode::VerifyFull => {
                return Err(format!(
                    "sslmode=verify-full: host {host:?} is not a name a certificate can hold: {e}"
                )
                .into())
            }
            // Not checked in the other modes: an IP address sends no SNI.
            Err(_) => ServerName::IpAddress(Ipv4Addr::UNSPECIFIED.into()),
        };
        Ok(PgTlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

/// One TLS handshake with one host.
pub struct PgTlsConnect {
    config: Option<Arc<ClientConfig>>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for PgTlsConnect {
    type Stream = PgTlsStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<PgTlsStream, BoxError>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or("TLS is disabled (sslmode=disable)")?;
            match tokio_rustls::TlsConnector::from(config)
                .connect(self.name, socket)
                .await
            {
                Ok(stream) => {
                    let end_point = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|certificate| tls_server_end_point(certificate));
                    Ok(PgTlsStream { stream, end_point })
                }
                Err(e) => match e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    Some(refusal) => Err(Box::new(TlsRefused(refusal.clone())) as BoxError),
                    None => Err(Box::new(e) as BoxError),
                },
            }
        })
    }
}

/// A TLS connection to PostgreSQL.
pub struct PgTlsStream {
    stream: tokio_rustls::client::TlsStream<Socket>,
    /// `tls-server-end-point` of the server's certificate, when its signature algorithm defines one.
    end_point: Option<Vec<u8>>,
}

impl TlsStream for PgTlsStream {
    /// With a password login (SCRAM), PostgreSQL then checks that the certificate we saw is its own
    /// (SCRAM-SHA-256-PLUS): a man in the middle cannot relay the login, even where the certificate is not
    /// verified (`prefer`, `require`).
    fn channel_binding(&self) -> ChannelBinding {
        match &self.end_point {
            Some(hash) => ChannelBinding::tls_server_end_point(hash.clone()),
            None => ChannelBinding::none(),
        }
    }
}

/// RFC 5929's `tls-server-end-point`: the certificate hashed with its signature's hash function, SHA-256
/// for MD5 and SHA-1. `None` for algorithms without a single hash function (Ed25519, RSA-PSS), for which
/// PostgreSQL defines none either; SCRAM then goes without channel binding.
fn tls_server_end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE { OID, … }, … }
    let (0x30, certificate_fields, _) = der_element(certificate)? else {
        return None;
    };
    let (0x30, _, after_tbs) = der_element(certificate_fields)? else {
        return None;
    };
    let (0x30, algorithm, _) = der_element(after_tbs)? else {
        return None;
    };
    let (0x06, oid, _) = der_element(algorithm)? else {
        return None;
    };
    const RSA: [u8; 8] = [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01];
    const ECDSA: [u8; 6] = [0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04];
    let hash = match oid {
        // md5WithRSAEncryption, sha1WithRSAEncryption, sha256WithRSAEncryption
        [rsa @ .., 0x04 | 0x05 | 0x0B] if rsa == RSA => &ring::digest::SHA256,
        [rsa @ .., 0x0C] if rsa == RSA => &ring::digest::SHA384,
        [rsa @ .., 0x0D] if rsa == RSA => &ring::digest::SHA512,
        // ecdsa-with-SHA1, ecdsa-with-SHA256, -SHA384, -SHA512
        [ecdsa @ .., 0x01] if ecdsa == ECDSA => &ring::digest::SHA256,
        [ecdsa @ .., 0x03, 0x02] if ecdsa == ECDSA => &ring::digest::SHA256,
        [ecdsa @ .., 0x03, 0x03] if ecdsa == ECDSA => &ring::digest::SHA384,
        [ecdsa @ .., 0x03, 0x04] if ecdsa == ECDSA => &ring::digest::SHA512,
        _ => return None,
    };
    Some(ring::digest::digest(hash, certificate).as_ref().to_vec())
}

/// The DER element at the start of `input`: its tag, its contents and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let bytes = usize::from(first & 0x7F);
        if bytes == 0 || bytes > 4 || rest.len() < bytes {
            return None;
        }
        let length = rest[..bytes]
            .iter()
            .fold(0usize, |length, &b| (length << 8) | usize::from(b));
        (length, &rest[bytes..])
    };
    (rest.len() >= length).then(|| (tag, &rest[..length], &rest[length..]))
}

impl AsyncRead for PgTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PgTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
