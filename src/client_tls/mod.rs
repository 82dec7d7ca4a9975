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
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::Host;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::Socket;

/// The one crypto provider of this crate (ring; never aws-lc-rs, which needs cmake and a C toolchain).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every PEM certificate in `path` and checks each can serve as a trust anchor.
pub fn read_ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
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

    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
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
// PostgreSQL: the connection string
// ---------------------------------------------------------------------------------------------------------

/// libpq's `sslmode` values (`allow` is not offered: tokio-postgres cannot try plain text first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it (libpq's default). Not verified unless `sslrootcert` is given.
    Prefer,
    /// TLS or no connection. Not verified unless `sslrootcert` is given (then as `verify-ca`).
    Require,
    /// TLS, and the server's certificate must chain to `sslrootcert`.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow is not supported: use prefer (TLS when offered) or disable".into(),
                )
            }
            other => {
                return Err(format!(
                    "sslmode={other:?} is not valid: expected disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// `sslrootcert`: a file of CA certificates, or `system` (libpq 16): the built-in web roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    System,
}

/// What a connection string says about TLS, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SslSettings {
    pub mode: Option<SslMode>,
    pub root_cert: Option<RootCert>,
}

/// Takes `sslmode` and `sslrootcert` out of a connection string (URL or key=value form); returns the rest,
/// for tokio-postgres, and what they said. Later occurrences win, as in libpq.
pub fn split_ssl_settings(conn: &str) -> Result<(String, SslSettings), String> {
    let mut settings = SslSettings::default();
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        match key {
            "sslmode" => settings.mode = Some(SslMode::parse(&value)?),
            "sslrootcert" if value.is_empty() => settings.root_cert = None,
            "sslrootcert" if value == "system" => settings.root_cert = Some(RootCert::System),
            "sslrootcert" => settings.root_cert = Some(RootCert::File(PathBuf::from(value))),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        split_url(conn, &mut take)?
    } else {
        split_key_values(conn, &mut take)?
    };
    Ok((rest, settings))
}

/// URL form: parameters after the first `?` that follows the credentials (tokio-postgres reads the
/// credentials up to the first `@`), `&`-separated, percent-encoded.
fn split_url(
    conn: &str,
    take: &mut impl FnMut(&str, String) -> Result<bool, String>,
) -> Result<String, String> {
    let after_credentials = conn.find('@').map_or(0, |at| at + 1);
    let Some(question) = conn[after_credentials..]
        .find('?')
        .map(|q| q + after_credentials)
    else {
        return Ok(conn.to_owned());
    };
    let mut kept = Vec::new();
    for parameter in conn[question + 1..].split('&') {
        let (key, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        if !take(&percent_decode(key)?, percent_decode(value)?)? {
            kept.push(parameter);
        }
    }
    let mut rest = conn[..question].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok(rest)
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {text:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

/// key=value form (libpq's rules): whitespace-separated `key = value`; a value is either single-quoted or
/// runs to the next whitespace; a backslash escapes the next character in both. The pairs that stay are
/// passed on exactly as written.
fn split_key_values(
    conn: &str,
    take: &mut impl FnMut(&str, String) -> Result<bool, String>,
) -> Result<String, String> {
    let bytes = conn.as_bytes();
    let mut kept = Vec::new();
    let mut i = 0;
    let skip_spaces = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_spaces(i);
        if i == bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &conn[start..i];
        i = skip_spaces(i);
        if bytes.get(i) != Some(&b'=') {
            return Err(format!(
                "missing \"=\" after {key:?} in the connection string"
            ));
        }
        i = skip_spaces(i + 1);
        let mut value = Vec::new();
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err(format!("unterminated quoted value of {key:?}")),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1]);
                        i += 2;
                    }
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
        }
        let value =
            String::from_utf8(value).map_err(|_| format!("the value of {key:?} is not UTF-8"))?;
        if !take(key, value)? {
            kept.push(&conn[start..i]);
        }
    }
    Ok(kept.join(" "))
}

/// `DATABASE_URL` understood: tokio-postgres' configuration and the TLS to connect with.
#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    pub postgres: tokio_postgres::Config,
    pub tls: PgTls,
}

/// A connection string that cannot be used (bad syntax, bad `sslmode`, unreadable `sslrootcert`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseUrlError(pub String);

impl fmt::Display for DatabaseUrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for DatabaseUrlError {}

impl FromStr for DatabaseConfig {
    type Err = DatabaseUrlError;

    /// Parses the connection string and loads `sslrootcert` (so an unreadable file stops start-up).
    fn from_str(conn: &str) -> Result<DatabaseConfig, DatabaseUrlError> {
        let (rest, settings) = split_ssl_settings(conn).map_err(DatabaseUrlError)?;
        let mut postgres: tokio_postgres::Config = rest.parse().map_err(|e| {
            DatabaseUrlError(format!("not a valid PostgreSQL connection string: {e}"))
        })?;
        let tls = PgTls::new(&settings, postgres.get_hosts()).map_err(DatabaseUrlError)?;
        postgres.ssl_mode(match tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        Ok(DatabaseConfig { postgres, tls })
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
    pub fn disabled() -> PgTls {
        PgTls {
            mode: SslMode::Disable,
            config: None,
        }
    }

    /// The mode in effect.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    fn new(settings: &SslSettings, hosts: &[Host]) -> Result<PgTls, String> {
        let system = settings.root_cert == Some(RootCert::System);
        let mode = match settings.mode {
            // libpq 16: `sslrootcert=system` makes `verify-full` the default and refuses anything weaker,
            // since public roots vouch for names, not for a particular server.
            None if system => SslMode::VerifyFull,
            None => SslMode::Prefer,
            Some(mode) if system && mode != SslMode::VerifyFull => {
                return Err(format!(
                    "sslmode={} cannot be used with sslrootcert=system: use sslmode=verify-full",
                    mode.as_str()
                ))
            }
            Some(mode) => mode,
        };
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
        let roots = match &settings.root_cert {
            None => None,
            Some(RootCert::System) => {
                let mut roots = RootCertStore::empty();
                roots.add_parsable_certificates(
                    webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned(),
                );
                Some(Arc::new(roots))
            }
            Some(RootCert::File(path)) => {
                let mut roots = RootCertStore::empty();
                roots.add_parsable_certificates(
                    read_ca_certificates(path).map_err(|e| format!("sslrootcert: {e}"))?,
                );
                Some(Arc::new(roots))
            }
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
            // libpq: without a root certificate, prefer and require encrypt without verifying; with one
            // they verify the chain, as verify-ca does.
            (SslMode::Prefer | SslMode::Require, None) => Arc::new(Unverified(provider.clone())),
            (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, Some(roots)) => {
                Arc::new(ChainOnly {
                    roots,
                    provider: provider.clone(),
                })
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(format!(
                "sslmode={} needs sslrootcert: a file of CA certificates (PEM), or system for the \
                     built-in web roots",
                mode.as_str()
            ))
            }
            (SslMode::VerifyFull, Some(roots)) => {
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("sslrootcert: {e}"))?
            }
            (SslMode::Disable, _) => unreachable!("handled above"),
        };
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

/// The server's TLS was refused: its certificate failed verification, or the handshake itself failed
/// (no common protocol version or cipher, a bad signature). Retrying does not help; the configuration (or
/// the server's certificate) must change. I/O failures during the handshake are passed on as
/// `std::io::Error` instead, which the store treats as "unavailable, retry later".
#[derive(Debug)]
pub struct TlsRefused(rustls::Error);

impl TlsRefused {
    /// True when `error` (from connecting) is a TLS refusal.
    pub fn is_cause_of(error: &tokio_postgres::Error) -> bool {
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

/// `prefer`/`require` without a root certificate (libpq's meaning): encrypted, but any certificate is
/// accepted, so an active attacker can sit in the middle. The handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (and `prefer`/`require` with a root certificate): the certificate must chain to one of
/// `roots` and be valid now; the name in it is not checked.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let certificate = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &certificate,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Unverified(self.provider.clone()).verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Unverified(self.provider.clone()).verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests;
