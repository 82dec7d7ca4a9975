//! TLS for clients: the certificate the server presents, and its reload when the files change.
//!
//! With `TLS_CERT_FILE` and `TLS_KEY_FILE` set, every accepted connection is a TLS connection; ALPN
//! offers `h2` and `http/1.1`, and the connection is served as whichever the client chose (the accept loop
//! in `server` does not care: hyper-util's auto builder recognises HTTP/2 by its preface). The crypto is
//! rustls with *ring*, so the static musl build stays pure Rust apart from ring's own C and assembly.
//!
//! The certificate lives in [`CertResolver`], which rustls asks at every handshake; a reload swaps it under
//! a lock. Connections that already shook hands keep their session, so a reload never drops one. Reloads
//! happen when the files' modification time or size changes (checked every `TLS_RELOAD_INTERVAL_MS`) and on
//! SIGHUP. A reload that fails (a half-written file, a key that does not match the certificate) keeps the
//! certificate in use and logs why.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TlsFiles;
use crate::log;

/// Why a certificate could not be loaded; the message names the variable whose file is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub(crate) String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// The server's TLS side: an acceptor for the accept loop and the files it reloads from.
pub struct ServerTls {
    acceptor: TlsAcceptor,
    resolver: Arc<CertResolver>,
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    /// What the files looked like when they were last read (successfully or not), so an unchanged failure
    /// is not logged again at every check. A std-free `parking_lot` mutex: only the reloading task and
    /// `reload` callers take it, never across an await.
    seen: parking_lot::Mutex<Option<Stamps>>,
}

/// Modification time and length of the certificate and the key file.
type Stamps = [(Option<SystemTime>, u64); 2];

impl ServerTls {
    /// Reads the certificate and key (a start-up error names the variable whose file is at fault).
    pub fn load(files: &TlsFiles) -> Result<ServerTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = stamps(files);
        let key = load_certified_key(files, &provider)?;
        let resolver = Arc::new(CertResolver {
            current: RwLock::new(Arc::new(key)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS set-up failed: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            files: files.clone(),
            provider,
            seen: parking_lot::Mutex::new(Some(stamps)),
        })
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads the files again and, if they hold a usable certificate and key, serves them from the next
    /// handshake on. On failure the certificate in use stays.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        *self.seen.lock() = Some(stamps(&self.files));
        let key = load_certified_key(&self.files, &self.provider)?;
        *self.resolver.current.write() = Arc::new(key);
        Ok(())
    }

    /// Reloads if either file changed since it was last read; logs the outcome. Returns whether it tried.
    pub(crate) fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.files);
        if self.seen.lock().as_ref() == Some(&now) {
            return false;
        }
        self.reload_and_log("changed on disk");
        true
    }

    fn reload_and_log(&self, why: &'static str) {
        match self.reload() {
            Ok(()) => log::info("TLS certificate reloaded", &[("trigger", why.into())]),
            Err(e) => log::warn(
                "TLS certificate reload failed; still serving the previous certificate",
                &[("trigger", why.into()), ("error", e.0.into())],
            ),
        }
    }

    /// Checks the files every `interval` and reloads on SIGHUP, until `shutdown` is cancelled (a task for
    /// the server's tracker).
    pub(crate) fn reloader(
        self: &Arc<Self>,
        interval: std::time::Duration,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let tls = self.clone();
        async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut hangup = match signal(SignalKind::hangup()) {
                Ok(hangup) => Some(hangup),
                Err(e) => {
                    log::warn(
                        "cannot listen for SIGHUP; TLS files are still checked periodically",
                        &[("error", e.to_string().into())],
                    );
                    None
                }
            };
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {
                        tls.reload_if_changed();
                    }
                    Some(()) = recv_hangup(&mut hangup) => tls.reload_and_log("SIGHUP"),
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }
}

async fn recv_hangup(hangup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hangup {
        Some(hangup) => hangup.recv().await,
        None => std::future::pending().await,
    }
}

/// Hands rustls the certificate of the moment. A read-write lock rather than a mutex: every handshake
/// reads it, a reload (rare) writes it; nothing awaits while holding it.
pub(crate) struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

fn stamps(files: &TlsFiles) -> Stamps {
    let stamp = |path: &Path| match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, 0),
    };
    [stamp(&files.cert), stamp(&files.key)]
}

/// Reads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1) and checks
/// that they belong together.
pub(crate) fn load_certified_key(
    files: &TlsFiles,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_error =
        |why: String| TlsError(format!("TLS_CERT_FILE={}: {why}", files.cert.display()));
    let key_error = |why: String| TlsError(format!("TLS_KEY_FILE={}: {why}", files.key.display()));
    let cert_pem =
        std::fs::read(&files.cert).map_err(|e| cert_error(format!("cannot read: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(cert_error("holds no CERTIFICATE block".into()));
    }
    let key_pem = std::fs::read(&files.key).map_err(|e| key_error(format!("cannot read: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| key_error(format!("not a PEM private key: {e}")))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_error(format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        // ring cannot always tell; rustls itself accepts that case.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(e) => Err(key_error(format!(
            "does not belong to the certificate in TLS_CERT_FILE: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mana-sync-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_pair(files: &TlsFiles, name: &str) {
        let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        std::fs::write(&files.cert, certified.cert.pem()).unwrap();
        std::fs::write(&files.key, certified.signing_key.serialize_pem()).unwrap();
    }

    fn leaf(tls: &ServerTls) -> Vec<u8> {
        tls.resolver.current.read().cert[0].to_vec()
    }

    #[test]
    fn bad_files_name_their_variable() {
        let dir = scratch("bad");
        let files = files(&dir);
        let error = ServerTls::load(&files).err().unwrap();
        assert!(error.0.starts_with("TLS_CERT_FILE="), "{error}");
        write_pair(&files, "localhost");
        std::fs::write(&files.key, "not a key").unwrap();
        let error = ServerTls::load(&files).err().unwrap();
        assert!(error.0.starts_with("TLS_KEY_FILE="), "{error}");
        std::fs::write(&files.cert, "").unwrap();
        let error = ServerTls::load(&files).err().unwrap();
        assert!(error.0.starts_with("TLS_CERT_FILE="), "{error}");
        // A key of another certificate.
        write_pair(&files, "localhost");
        let other = rcgen::generate_simple_self_signed(vec!["other".to_owned()]).unwrap();
        std::fs::write(&files.key, other.signing_key.serialize_pem()).unwrap();
        let error = ServerTls::load(&files).err().unwrap();
        assert!(error.0.contains("does not belong"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_reload_keeps_the_certificate_and_a_good_one_replaces_it() {
        let dir = scratch("reload");
        let files = files(&dir);
        write_pair(&files, "localhost");
        let tls = ServerTls::load(&files).unwrap();
        let first = leaf(&tls);
        assert!(!tls.reload_if_changed(), "nothing changed");

        std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\ngarbage").unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(leaf(&tls), first, "the old certificate stays");
        assert!(
            !tls.reload_if_changed(),
            "a failure is not retried until the files change"
        );

        write_pair(&files, "localhost");
        tls.reload().unwrap();
        assert_ne!(leaf(&tls), first);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
