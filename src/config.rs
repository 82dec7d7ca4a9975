//! Configuration: read once from the environment at start-up, validated, then passed explicitly.
//!
//! No other module reads the environment. A bad value stops the server at start with a message that names
//! the variable, instead of surfacing later as a confusing runtime failure.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the server can be told.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind_address: IpAddr,
    pub port: u16,
    /// `None`: run the embedded PostgreSQL under `data_dir` (SPEC §14).
    pub database_url: Option<String>,
    pub data_dir: PathBuf,
    /// The directories of `PATH`: where the embedded PostgreSQL's binaries are also looked for.
    pub(crate) search_path: Vec<PathBuf>,
    /// The working directory at start (`from_env`), which a relative `data_dir` of the embedded
    /// PostgreSQL is resolved against; `None` without a process environment (`from_lookup`).
    pub(crate) working_dir: Option<PathBuf>,
    pub jwks_url: Option<String>,
    pub jwks_file: Option<PathBuf>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// Verified tokens remembered so a repeated token skips the signature check; 0 disables the cache.
    pub(crate) auth_cache_size: usize,
    pub cors_origins: Vec<String>,
    pub mana_credits_url: Option<String>,
    pub mana_service_key: Option<String>,
    /// Roots for `https://` fetches (JWKS, billing): the built-in web roots plus `MANA_CA_FILE`.
    pub outbound_tls: crate::client_tls::OutboundTls,
    pub max_body_bytes: usize,
    /// Bytes of large request bodies being read or worked on at once (`http::body_budget`); a user gets the
    /// larger of one maximal body and a quarter of it.
    pub max_inflight_body_bytes: usize,
    pub(crate) pull_page_size: usize,
    pub(crate) pull_max_page_size: usize,
    pub db_pool_size: usize,
    /// Pool connections one user may hold at once.
    pub db_max_per_user: usize,
    /// Groups of small pushes of different users at the database at once (`store/group.rs`); 0: none.
    pub push_groups: usize,
    /// Pushes in one group at most (fewer than 2: no groups).
    pub push_group_max: usize,
    /// Pushes at the database at once (this one included) before small pushes start to group.
    pub push_group_after: usize,
    /// PostgreSQL's statement timeout for our sessions, and (plus 1 s) how long a request waits for the
    /// database; `None` (0): no limit.
    pub db_statement_timeout: Option<Duration>,
    pub db_acquire_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
    pub log_level: crate::log::Level,
    /// A WebSocket must authenticate within this.
    pub ws_auth_timeout: Duration,
    pub ws_max_per_user: usize,
    /// WebSockets waiting to authenticate, over all users.
    pub ws_max_unauthenticated: usize,
    /// Added to a token's expiry before its socket is closed (at most 60 s per the contract).
    pub ws_token_leeway: Duration,
    pub(crate) ws_messages_per_second: u32,
    /// Hints waiting per connection before it counts as a slow consumer.
    pub(crate) notify_queue_capacity: usize,
    /// A socket or stream write that takes longer closes the connection as a slow consumer.
    pub write_timeout: Duration,
    pub sse_heartbeat: Duration,
    /// Log rows older than this are pruned (clients behind it get a snapshot); `None`: keep everything.
    pub log_retention: Option<Duration>,
    pub(crate) compaction_interval: Duration,
    pub billing_cache_ttl: Duration,
    pub billing_timeout: Duration,
    pub billing_cache_max_users: usize,
    /// Requests handled at once; more get 503 + Retry-After instead of queueing without bound.
    pub max_concurrent_requests: usize,
    /// Requests of one user handled at once; more get 429 + Retry-After.
    pub max_requests_per_user: usize,
    /// A keep-alive connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A request body must arrive completely within this (slow-body attacks hold connections otherwise).
    pub body_read_timeout: Duration,
    /// How far past its arrival a change's timestamps are believed; later ones are ordered at that bound.
    pub max_future_skew: Duration,
    /// A log page (pull, push response, stream event) holds about this many bytes at most (one row at least).
    pub page_max_bytes: usize,
    /// Users whose newest stamp is kept in memory to answer "nothing new" (0: never answer from memory).
    pub(crate) known_stamps_max_users: usize,
    /// Serve HTTPS (and WSS) with this certificate and key; `None`: plain HTTP (`server_tls`).
    pub tls: Option<TlsFiles>,
    /// How often the certificate and key files are checked for changes (SIGHUP also reloads them).
    pub tls_reload_interval: Duration,
    /// Streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub http2_max_concurrent_streams: u32,
    /// Largest request header block accepted over HTTP/2 (SETTINGS_MAX_HEADER_LIST_SIZE); larger: 431.
    pub http2_max_header_list_bytes: u32,
}

/// The PEM files of the server's certificate chain and private key (`TLS_CERT_FILE`, `TLS_KEY_FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A configuration value that cannot be used; the message names the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub(crate) String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

pub(crate) const DEFAULT_JWKS_URL: &str = "http://localhost:3001/api/auth/jwks";

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let mut config = Config::from_lookup(|name| std::env::var(name).ok())?;
        config.working_dir = std::env::current_dir().ok();
        Ok(config)
    }

    /// Reads configuration through `lookup`, so tests can supply variables without touching the process.
    pub(crate) fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let get = |name: &str| lookup(name).map(|v| v.trim().to_owned());
        let set = |name: &str| get(name).filter(|v| !v.is_empty());

        let database_url = set("DATABASE_URL");
        let data_dir = PathBuf::from(set("MANA_SYNC_DATA_DIR").unwrap_or_else(|| "./data".into()));
        // The dev key written by `mana-sync keygen` is trusted only with the embedded database, which is
        // the development set-up; production always names its database and its JWKS.
        let jwks_file = match set("JWKS_FILE") {
            Some(path) => Some(PathBuf::from(path)),
            None if database_url.is_none() => Some(data_dir.join("dev-jwks.json")),
            None => None,
        };
        let jwks_url = match get("JWKS_URL") {
            None => Some(DEFAULT_JWKS_URL.to_owned()),
            Some(url) if url.is_empty() => None,
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => Some(url),
            Some(url) => {
                return Err(ConfigError(format!(
                    "JWKS_URL={url:?} must be an http:// or https:// URL (or empty)"
                )))
            }
        };
        let mana_credits_url = match set("MANA_CREDITS_URL") {
            Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                return Err(ConfigError(format!(
                    "MANA_CREDITS_URL={url:?} must be an http:// or https:// URL"
                )))
            }
            other => other,
        };

        let outbound_tls = match set("MANA_CA_FILE") {
            None => crate::client_tls::OutboundTls::web_roots(),
            Some(path) => crate::client_tls::OutboundTls::with_ca_file(path.as_ref())
                .map_err(|e| ConfigError(format!("MANA_CA_FILE={path:?} is not usable: {e}")))?,
        };

        let config = Config {
            bind_address: parse(
                &get,
                "BIND_ADDRESS",
                "0.0.0.0".parse().expect("valid"),
                "an IP address",
            )?,
            port: parse(&get, "PORT", 3050, "a port number (0-65535)")?,
            database_url,
            data_dir,
            // Not trimmed: a directory name may end in a space.
            search_path: lookup("PATH")
                .map(|path| std::env::split_paths(&path).collect())
                .unwrap_or_default(),
            working_dir: None,
            jwks_url,
            jwks_file,
            jwt_issuer: set("JWT_ISSUER"),
            // Unset means the default audience; set but empty means "do not check".
            jwt_audience: match get("JWT_AUDIENCE") {
                None => Some("mana".to_owned()),
                Some(aud) if aud.is_empty() => None,
                Some(aud) => Some(aud),
            },
            auth_cache_size: parse(
                &get,
                "AUTH_CACHE_SIZE",
                100_000,
                "a number of tokens (0 disables the cache)",
            )?,
            cors_origins: set("CORS_ORIGINS")
                .map(|v| {
                    v.split(',')
                        .map(|o| o.trim().to_owned())
                        .filter(|o| !o.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            mana_credits_url,
            mana_service_key: set("MANA_SERVICE_KEY"),
            outbound_tls,
            max_body_bytes: positive(&get, "MAX_BODY_BYTES", 10 * 1024 * 1024)?,
            max_inflight_body_bytes: positive(&get, "MAX_INFLIGHT_BODY_BYTES", 32 * 1024 * 1024)?,
            pull_page_size: positive(&get, "PULL_PAGE_SIZE", 1000)?,
            pull_max_page_size: positive(&get, "PULL_MAX_PAGE_SIZE", 5000)?,
            db_pool_size: positive(&get, "DB_POOL_SIZE", 16)?,
            db_max_per_user: positive(&get, "DB_MAX_PER_USER", 4)?,
            push_groups: parse(&get, "PUSH_GROUPS", 2usize, "a number of groups (0 = none)")?,
            push_group_max: positive(&get, "PUSH_GROUP_MAX", 16)?,
            push_group_after: parse(&get, "PUSH_GROUP_AFTER", 8usize, "a number of pushes")?,
            db_statement_timeout: match parse(
                &get,
                "DB_STATEMENT_TIMEOUT_MS",
                120_000u64,
                "milliseconds (0 = no limit)",
            )? {
                0 => None,
                millis => Some(Duration::from_millis(millis)),
            },
            db_acquire_timeout: millis(&get, "DB_ACQUIRE_TIMEOUT_MS", 5000)?,
            header_read_timeout: millis(&get, "HEADER_READ_TIMEOUT_MS", 10_000)?,
            max_connections: positive(&get, "MAX_CONNECTIONS", 10_000)?,
            shutdown_timeout: millis(&get, "SHUTDOWN_TIMEOUT_MS", 10_000)?,
            log_level: parse(
                &get,
                "LOG_LEVEL",
                crate::log::Level::Info,
                "one of error, warn, info, debug",
            )?,
            ws_auth_timeout: millis(&get, "WS_AUTH_TIMEOUT_MS", 10_000)?,
            ws_max_per_user: positive(&get, "WS_MAX_PER_USER", 50)?,
            ws_max_unauthenticated: positive(&get, "WS_MAX_UNAUTHENTICATED", 1000)?,
            ws_token_leeway: Duration::from_secs(parse(
                &get,
                "WS_TOKEN_LEEWAY_SECS",
                30u64,
                "0-60 seconds",
            )?),
            ws_messages_per_second: positive(&get, "WS_MESSAGES_PER_SECOND", 10)? as u32,
            notify_queue_capacity: positive(&get, "NOTIFY_QUEUE_CAPACITY", 64)?,
            write_timeout: millis(&get, "WRITE_TIMEOUT_MS", 10_000)?,
            sse_heartbeat: millis(&get, "SSE_HEARTBEAT_MS", 30_000)?,
            log_retention: match set("LOG_RETENTION_SECS") {
                None => None,
                Some(_) => Some(Duration::from_secs(
                    positive(&get, "LOG_RETENTION_SECS", 1)? as u64,
                )),
            },
            compaction_interval: millis(&get, "COMPACTION_INTERVAL_MS", 600_000)?,
            billing_cache_ttl: Duration::from_secs(
                positive(&get, "BILLING_CACHE_TTL_SECS", 300)? as u64
            ),
            billing_timeout: millis(&get, "BILLING_TIMEOUT_MS", 2000)?,
            billing_cache_max_users: positive(&get, "BILLING_CACHE_MAX_USERS", 100_000)?,
            max_concurrent_requests: positive(&get, "MAX_CONCURRENT_REQUESTS", 1024)?,
            max_requests_per_user: positive(&get, "MAX_REQUESTS_PER_USER", 64)?,
            idle_timeout: millis(&get, "IDLE_TIMEOUT_MS", 60_000)?,
            page_max_bytes: positive(&get, "PAGE_MAX_BYTES", 4 * 1024 * 1024)?,
            max_future_skew: Duration::from_secs(
                positive(&get, "MAX_FUTURE_SKEW_SECS", 86_400)? as u64
            ),
            known_stamps_max_users: parse(
                &get,
                "KNOWN_STAMPS_MAX_USERS",
                100_000usize,
                "a number of users (0 = off)",
            )?,
            body_read_timeout: millis(&get, "BODY_READ_TIMEOUT_MS", 60_000)?,
            tls: match (set("TLS_CERT_FILE"), set("TLS_KEY_FILE")) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: PathBuf::from(cert),
                    key: PathBuf::from(key),
                }),
                (Some(_), None) => {
                    return Err(ConfigError(
                        "TLS_KEY_FILE is unset but TLS_CERT_FILE is set: set both (HTTPS) or neither (plain HTTP)"
                            .into(),
                    ))
                }
                (None, Some(_)) => {
                    return Err(ConfigError(
                        "TLS_CERT_FILE is unset but TLS_KEY_FILE is set: set both (HTTPS) or neither (plain HTTP)"
                            .into(),
                    ))
                }
            },
            tls_reload_interval: millis(&get, "TLS_RELOAD_INTERVAL_MS", 5000)?,
            http2_max_concurrent_streams: u32::try_from(positive(
                &get,
                "HTTP2_MAX_CONCURRENT_STREAMS",
                100,
            )?)
            .map_err(|_| ConfigError("HTTP2_MAX_CONCURRENT_STREAMS is too large".into()))?,
            http2_max_header_list_bytes: u32::try_from(positive(
                &get,
                "HTTP2_MAX_HEADER_LIST_BYTES",
                16 * 1024,
            )?)
            .map_err(|_| ConfigError("HTTP2_MAX_HEADER_LIST_BYTES is too large".into()))?,
        };
        if config.ws_token_leeway > Duration::from_secs(60) {
            return Err(ConfigError(
                "WS_TOKEN_LEEWAY_SECS must be at most 60".into(),
            ));
        }
        if config.max_inflight_body_bytes < config.max_body_bytes {
            return Err(ConfigError(format!(
                "MAX_INFLIGHT_BODY_BYTES={} must be at least MAX_BODY_BYTES={}",
                config.max_inflight_body_bytes, config.max_body_bytes
            )));
        }
        if config.pull_page_size > config.pull_max_page_size {
            return Err(ConfigError(format!(
                "PULL_PAGE_SIZE={} must not exceed PULL_MAX_PAGE_SIZE={}",
                config.pull_page_size, config.pull_max_page_size
            )));
        }
        Ok(config)
    }

    /// A configuration for tests and tools: defaults, no environment.
    pub fn defaults() -> Config {
        Config::from_lookup(|_| None).expect("defaults are valid")
    }
}

fn parse<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: T,
    expected: &str,
) -> Result<T, ConfigError> {
    match get(name) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| ConfigError(format!("{name}={v:?} is not valid: expected {expected}"))),
    }
}

fn positive(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: usize,
) -> Result<usize, ConfigError> {
    match parse(get, name, default, "a positive integer")? {
        0 => Err(ConfigError(format!(
            "{name}=0 is not valid: expected a positive integer"
        ))),
        n => Ok(n),
    }
}

fn millis(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: usize,
) -> Result<Duration, ConfigError> {
    Ok(Duration::from_millis(positive(get, name, default)? as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(move |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_follow_the_spec() {
        let config = Config::defaults();
        assert_eq!(config.port, 3050);
        assert_eq!(config.jwks_url.as_deref(), Some(DEFAULT_JWKS_URL));
        assert_eq!(config.jwt_audience.as_deref(), Some("mana"));
        assert_eq!(config.jwt_issuer, None);
        assert_eq!(config.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(
            (config.pull_page_size, config.pull_max_page_size),
            (1000, 5000)
        );
        assert!(config.database_url.is_none());
        assert_eq!(
            config.jwks_file,
            Some(PathBuf::from("./data/dev-jwks.json"))
        );
        assert!(config.mana_credits_url.is_none());
        assert_eq!(config.auth_cache_size, 100_000);
    }

    #[test]
    fn auth_cache_size_accepts_zero() {
        assert_eq!(
            with(&[("AUTH_CACHE_SIZE", "0")]).unwrap().auth_cache_size,
            0
        );
        assert_eq!(
            with(&[("AUTH_CACHE_SIZE", "250")]).unwrap().auth_cache_size,
            250
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("PORT", "http"),
            ("PORT", "70000"),
            ("DB_POOL_SIZE", "0"),
            ("MAX_BODY_BYTES", "-1"),
            ("JWKS_URL", "ftp://x"),
            ("MANA_CREDITS_URL", "localhost:3061"),
            ("LOG_LEVEL", "loud"),
            ("BIND_ADDRESS", "everywhere"),
            ("AUTH_CACHE_SIZE", "-1"),
            ("AUTH_CACHE_SIZE", "lots"),
            ("TLS_RELOAD_INTERVAL_MS", "0"),
            ("HTTP2_MAX_CONCURRENT_STREAMS", "0"),
            ("HTTP2_MAX_CONCURRENT_STREAMS", "99999999999"),
            ("HTTP2_MAX_HEADER_LIST_BYTES", "lots"),
            ("MANA_CA_FILE", "/nonexistent/ca.pem"),
            ("MANA_CA_FILE", "/dev/null"),
        ] {
            let error = with(&[(name, value)]).expect_err(name);
            assert!(error.0.starts_with(name), "{error}");
        }
        let error = with(&[("PULL_PAGE_SIZE", "6000")]).unwrap_err();
        assert!(error.0.contains("PULL_PAGE_SIZE"), "{error}");
        // A budget for large bodies smaller than one body would refuse every maximal push.
        let error = with(&[("MAX_INFLIGHT_BODY_BYTES", "1048576")]).unwrap_err();
        assert!(error.0.starts_with("MAX_INFLIGHT_BODY_BYTES"), "{error}");
        let config = with(&[
            ("MAX_INFLIGHT_BODY_BYTES", "1048576"),
            ("MAX_BODY_BYTES", "1048576"),
        ])
        .unwrap();
        assert_eq!(config.max_inflight_body_bytes, 1_048_576);
    }

    #[test]
    fn tls_needs_both_files_or_neither() {
        assert_eq!(Config::defaults().tls, None, "plain HTTP is the default");
        let error = with(&[("TLS_CERT_FILE", "/etc/cert.pem")]).unwrap_err();
        assert!(error.0.starts_with("TLS_KEY_FILE"), "{error}");
        let error = with(&[("TLS_KEY_FILE", "/etc/key.pem")]).unwrap_err();
        assert!(error.0.starts_with("TLS_CERT_FILE"), "{error}");
        let error = with(&[("TLS_CERT_FILE", "/etc/cert.pem"), ("TLS_KEY_FILE", " ")]).unwrap_err();
        assert!(error.0.starts_with("TLS_KEY_FILE"), "{error}");
        let config = with(&[
            ("TLS_CERT_FILE", "/etc/cert.pem"),
            ("TLS_KEY_FILE", "/etc/key.pem"),
        ])
        .unwrap();
        assert_eq!(
            config.tls,
            Some(TlsFiles {
                cert: "/etc/cert.pem".into(),
                key: "/etc/key.pem".into()
            })
        );
        assert_eq!(config.tls_reload_interval, Duration::from_secs(5));
        assert_eq!(config.http2_max_concurrent_streams, 100);
        assert_eq!(config.http2_max_header_list_bytes, 16 * 1024);
    }

    #[test]
    fn empty_values_mean_what_the_spec_says() {
        let config = with(&[
            ("JWT_AUDIENCE", ""),
            ("JWKS_URL", ""),
            ("MANA_CREDITS_URL", ""),
            ("PORT", ""),
        ])
        .unwrap();
        assert_eq!(config.jwt_audience, None);
        assert_eq!(config.jwks_url, None);
        assert_eq!(config.mana_credits_url, None);
        assert_eq!(config.port, 3050);
        let config = with(&[
            ("DATABASE_URL", "host=/tmp user=x"),
            ("CORS_ORIGINS", "https://a.example, http://b:5173,"),
        ])
        .unwrap();
        assert_eq!(
            config.jwks_file, None,
            "no dev key outside the embedded set-up"
        );
        assert_eq!(
            config.cors_origins,
            vec!["https://a.example", "http://b:5173"]
        );
    }
}
