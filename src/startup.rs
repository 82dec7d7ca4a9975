//! Start-up: from a `Config` to the running server's shared state (database, schema, auth), and the
//! background tasks it starts (key refresh, certificate reload, the cross-instance listener, compaction).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::auth::{AuthConfig, Authenticator};
use crate::billing::{Billing, BillingConfig};
use crate::client_tls::DatabaseConfig;
use crate::config::Config;
use crate::devdb::{EmbeddedOptions, EmbeddedPostgres};
use crate::log;
use crate::metrics::Metrics;
use crate::realtime::{self, Hub};
use crate::server_tls::ServerTls;
use crate::state::body_budget::BodyBudget;
use crate::state::per_user::InFlight;
use crate::state::Shared;
use crate::store::{Migration, Store, StoreError, StoreOptions};

/// A failure to start, with a message for the operator.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// The database the server talks to, and the embedded cluster when it runs one.
pub struct Database {
    pub config: DatabaseConfig,
    pub embedded: Option<EmbeddedPostgres>,
}

/// `DATABASE_URL` when set; otherwise starts (or re-opens) the embedded cluster under the data directory.
pub async fn open_database(config: &Config) -> Result<Database, StartError> {
    let (url, embedded) = match &config.database_url {
        Some(url) => (url.clone(), None),
        None => {
            log::info(
                "DATABASE_URL is unset: starting the embedded PostgreSQL",
                &[("dataDir", config.data_dir.display().to_string().into())],
            );
            let embedded = EmbeddedPostgres::start(EmbeddedOptions::for_server(config))
                .await
                .map_err(|e| StartError(format!("embedded PostgreSQL: {e}")))?;
            (embedded.connection_string(), Some(embedded))
        }
    };
    let parsed = url
        .parse::<DatabaseConfig>()
        .map_err(|e| StartError(format!("DATABASE_URL: {e}")))?;
    Ok(Database {
        config: parsed,
        embedded,
    })
}

pub fn auth_config(config: &Config) -> AuthConfig {
    AuthConfig {
        jwks_url: config.jwks_url.clone(),
        jwks_file: config.jwks_file.clone(),
        issuer: config.jwt_issuer.clone(),
        audience: config.jwt_audience.clone(),
        verified_cache_size: config.auth_cache_size,
        tls: config.outbound_tls.clone(),
        ..AuthConfig::default()
    }
}

/// Opens the store, applies the schema (retrying for a while if the database is still coming up) and
/// starts the key refresher.
pub async fn build(config: Config, database: DatabaseConfig) -> Result<Arc<Shared>, StartError> {
    // First: a certificate that cannot be read stops the start before the database is touched.
    let tls = load_server_tls(&config)?;
    let store = open_store(&config, database).await?;
    let billing = billing(&config);
    let auth = start_auth(&config).await;
    let hub = Arc::new(Hub::new(
        config.notify_queue_capacity,
        config.ws_max_per_user,
    ));
    let request_permits = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests));
    let requests_per_user = InFlight::new(config.max_requests_per_user);
    let body_budget = BodyBudget::new(config.max_inflight_body_bytes, config.max_body_bytes);
    let unauthenticated_sockets =
        Arc::new(tokio::sync::Semaphore::new(config.ws_max_unauthenticated));
    let shared = Arc::new(Shared {
        config,
        store,
        auth,
        hub,
        shutdown: CancellationToken::new(),
        tasks: tokio_util::task::TaskTracker::new(),
        instance_id: instance_id(),
        rows_pruned: AtomicU64::new(0),
        billing,
        metrics: Metrics::default(),
        request_permits,
        requests_per_user,
        body_budget,
        unauthenticated_sockets,
        tls,
        open_connections: AtomicUsize::new(0),
    });
    spawn_background_tasks(&shared);
    Ok(shared)
}

/// The certificate we serve, when `TLS_CERT_FILE`/`TLS_KEY_FILE` are set.
fn load_server_tls(config: &Config) -> Result<Option<Arc<ServerTls>>, StartError> {
    match &config.tls {
        None => Ok(None),
        Some(files) => Ok(Some(Arc::new(
            ServerTls::load(files).map_err(|e| StartError(e.to_string()))?,
        ))),
    }
}

/// The store, with the schema applied; warns when the role is not bound by row-level security.
async fn open_store(config: &Config, database: DatabaseConfig) -> Result<Store, StartError> {
    let store = Store::new(
        database,
        &StoreOptions {
            pool_size: config.db_pool_size,
            acquire_timeout: config.db_acquire_timeout,
            retention: config.log_retention,
            known_users: config.known_stamps_max_users,
            max_per_user: config.db_max_per_user,
            statement_timeout: config.db_statement_timeout,
            max_future_skew: config.max_future_skew,
            page_max_bytes: config.page_max_bytes,
            push_groups: (
                config.push_groups,
                config.push_group_max,
                config.push_group_after,
            ),
        },
    );
    migrate(&store).await?;
    match store.bypasses_row_level_security().await {
        Ok(true) => log::warn(
            "connected as a superuser or BYPASSRLS role: row-level security does not bind it; \
             connect as an ordinary role",
            &[],
        ),
        Ok(false) => {}
        Err(e) => log::warn(
            "could not check the database role",
            &[("error", e.to_string().into())],
        ),
    }
    Ok(store)
}

/// The billing gate, when `MANA_CREDITS_URL` is set.
fn billing(config: &Config) -> Option<Billing> {
    let Some(url) = &config.mana_credits_url else {
        log::info("billing gate off: MANA_CREDITS_URL is unset", &[]);
        return None;
    };
    log::info("billing gate on", &[("url", url.as_str().into())]);
    Some(Billing::new(BillingConfig {
        url: url.clone(),
        service_key: config.mana_service_key.clone(),
        cache_ttl: config.billing_cache_ttl,
        timeout: config.billing_timeout,
        max_cached_users: config.billing_cache_max_users,
        tls: config.outbound_tls.clone(),
    }))
}

/// The authenticator with its first keys loaded (or a warning why not) and its refresher started.
async fn start_auth(config: &Config) -> Authenticator {
    let auth = Authenticator::new(auth_config(config));
    match auth.refresh().await {
        Ok(keys) => log::info("signing keys loaded", &[("keys", keys.into())]),
        Err(e) if auth.key_count() > 0 => log::warn(
            "a signing key source failed; using the keys that loaded",
            &[("keys", auth.key_count().into()), ("error", e.into())],
        ),
        Err(e) => log::warn(
            "no signing keys loaded yet; will retry",
            &[("error", e.into())],
        ),
    }
    auth
}

/// Key refresh, certificate reload, the cross-instance listener and compaction: each in `shared.tasks`, each
/// ending when `shared.shutdown` is cancelled (the drain waits for them as for connections).
fn spawn_background_tasks(shared: &Arc<Shared>) {
    let (tasks, shutdown) = (&shared.tasks, &shared.shutdown);
    tasks.spawn(shared.auth.refresher(shutdown.clone()));
    if let Some(tls) = &shared.tls {
        tasks.spawn(tls.reloader(shared.config.tls_reload_interval, shutdown.clone()));
    }
    tasks.spawn(realtime::listener(shared.clone()));
    if shared.config.log_retention.is_some() {
        tasks.spawn(compactor(shared.clone()));
    }
}

/// Prunes the log every `compaction_interval` (SPEC §6), until shutdown; a pass under way finishes first.
async fn compactor(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(shared.config.compaction_interval);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shared.shutdown.cancelled() => return,
        }
        match shared.store.compact(1000).await {
            Ok(Some(pruned)) => {
                shared.rows_pruned.fetch_add(pruned, Ordering::Relaxed);
                log::info("log compaction done", &[("rowsPruned", pruned.into())]);
            }
            Ok(None) => log::debug(
                "log compaction skipped: another instance is running it",
                &[],
            ),
            Err(e) => log::warn("log compaction failed", &[("error", e.to_string().into())]),
        }
    }
}

/// A random id for this process (not a secret: it only has to differ between instances).
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut random, &mut bytes);
    }
    format!(
        "{:016x}{:08x}",
        u64::from_le_bytes(bytes) ^ crate::clock::now_micros() as u64,
        std::process::id()
    )
}

pub async fn migrate(store: &Store) -> Result<Migration, StartError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.migrate().await {
            Ok(outcome) => {
                log::info(
                    "schema ready",
                    &[("migration", format!("{outcome:?}").into())],
                );
                return Ok(outcome);
            }
            // An untrusted or misnamed certificate, or a login pg_hba.conf refuses, does not go away by
            // waiting: say so at once, naming where the connection settings come from.
            Err(StoreError::Unavailable(why)) if why.is_connection_refused() => {
                return Err(StartError(format!(
                    "DATABASE_URL: the database refused the connection: {why}"
                )))
            }
            Err(StoreError::Unavailable(why)) if Instant::now() < deadline => {
                log::warn(
                    "database not reachable yet; retrying",
                    &[("error", why.to_string().into())],
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(StartError(format!("applying schema.sql failed: {e}"))),
        }
    }
}
