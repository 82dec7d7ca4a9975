//! `DATABASE_URL`: `sslmode` and `sslrootcert` taken out of the connection string (URL or key=value form)
//! before tokio-postgres reads the rest, and the [`PgTls`] they ask for.

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::PgTls;

/// libpq's `sslmode` values (`allow` is not offered: tokio-postgres cannot try plain text first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
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

    pub(crate) fn as_str(self) -> &'static str {
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
pub(crate) enum RootCert {
    File(PathBuf),
    System,
}

/// What a connection string says about TLS, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SslSettings {
    pub(crate) mode: Option<SslMode>,
    pub(crate) root_cert: Option<RootCert>,
}

/// Takes `sslmode` and `sslrootcert` out of a connection string (URL or key=value form); returns the rest,
/// for tokio-postgres, and what they said. Later occurrences win, as in libpq.
pub(crate) fn split_ssl_settings(conn: &str) -> Result<(String, SslSettings), String> {
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
pub struct DatabaseUrlError(pub(crate) String);

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
