//! The `mana-sync` command: a thin shell over the library.
//!
//! `serve` (default) runs the server, `migrate` applies the schema and exits, `keygen` and `token` give a
//! development set-up its own signing key so that nobody needs mana-auth to try the server.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use mana_sync::auth::devkeys;
use mana_sync::config::Config;
use mana_sync::{log, server, startup};

/// mimalloc instead of the C library's allocator (Cargo.toml says why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
mana-sync: sync server for local-first apps

Usage: mana-sync [COMMAND] [OPTIONS]

Commands:
  serve     Run the server (the default). With DATABASE_URL unset it runs its own PostgreSQL.
  migrate   Apply schema.sql to the database and exit.
  keygen    Write a development Ed25519 signing key and its JWKS file.
  token     Mint a development token signed by the keygen key.
  healthcheck  Exit 0 if the local server answers /health with 200 (for container HEALTHCHECKs).
  help      Show this text; `mana-sync COMMAND --help` shows a command's options.

Configuration comes from the environment; see README.md for the table.
";

const SERVE_USAGE: &str = "\
Usage: mana-sync serve

Runs the sync server on PORT (default 3050) until SIGTERM or SIGINT. With DATABASE_URL unset it starts
and owns a PostgreSQL cluster under MANA_SYNC_DATA_DIR (default ./data) and trusts the development key
in that directory (see `mana-sync keygen`).
";

const MIGRATE_USAGE: &str = "\
Usage: mana-sync migrate

Applies schema.sql (additive, idempotent) to DATABASE_URL, or to the embedded database when unset.
";

const KEYGEN_USAGE: &str = "\
Usage: mana-sync keygen [--dir DIR]

Writes DIR/dev-signing-key.json (private, mode 0600) and DIR/dev-jwks.json (public). DIR defaults to
MANA_SYNC_DATA_DIR (./data), where `mana-sync serve` with the embedded database looks for it. An existing
key is never overwritten.
";

const TOKEN_USAGE: &str = "\
Usage: mana-sync token --sub USER [--ttl 15m] [--key FILE]

Prints a token for USER signed with the development key (default: MANA_SYNC_DATA_DIR/dev-signing-key.json).
TTL accepts 900, 30s, 15m, 2h, 7d. The token carries JWT_ISSUER and JWT_AUDIENCE (default \"mana\") so the
server accepts it.
";

const HEALTHCHECK_USAGE: &str = "\
Usage: mana-sync healthcheck [--url URL]

Requests URL (default http://127.0.0.1:$PORT/health, or https:// when TLS_CERT_FILE is set, without
checking the certificate: it names the public host, not 127.0.0.1) and exits 0 on HTTP 200, 1 otherwise.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((first, rest)) if !first.starts_with('-') => (first.as_str(), rest),
        Some((first, _)) if first == "--help" || first == "-h" => ("help", &[][..]),
        _ => ("serve", args.as_slice()),
    };
    let wants_help = rest.iter().any(|a| a == "--help" || a == "-h");
    let result = match command {
        "help" => {
            print!("{USAGE}");
            Ok(())
        }
        "serve" if wants_help => help(SERVE_USAGE),
        "migrate" if wants_help => help(MIGRATE_USAGE),
        "keygen" if wants_help => help(KEYGEN_USAGE),
        "token" if wants_help => help(TOKEN_USAGE),
        "healthcheck" if wants_help => help(HEALTHCHECK_USAGE),
        "healthcheck" => healthcheck(rest),
        "serve" => no_options(rest, SERVE_USAGE).and_then(|()| runtime(serve())),
        "migrate" => no_options(rest, MIGRATE_USAGE).and_then(|()| runtime(migrate())),
        "keygen" => keygen(rest),
        "token" => token(rest),
        other => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("mana-sync: {message}");
            ExitCode::FAILURE
        }
    }
}

fn help(text: &str) -> Result<(), String> {
    print!("{text}");
    Ok(())
}

fn no_options(rest: &[String], usage: &str) -> Result<(), String> {
    match rest.first() {
        None => Ok(()),
        Some(unexpected) => Err(format!("unexpected argument {unexpected:?}\n\n{usage}")),
    }
}

fn runtime(work: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?
        .block_on(work)
}

fn config() -> Result<Config, String> {
    let config = Config::from_env().map_err(|e| e.to_string())?;
    log::set_level(config.log_level);
    Ok(config)
}

async fn serve() -> Result<(), String> {
    let config = config()?;
    // Unusable certificate files stop the start before a database is started (they are read again when
    // the state is built: by then they may have been renewed).
    if let Some(files) = &config.tls {
        mana_sync::server_tls::ServerTls::load(files).map_err(|e| e.to_string())?;
    }
    let addr = SocketAddr::new(config.bind_address, config.port);
    // Bind before starting the database so a taken port fails fast and leaves nothing behind.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let database = startup::open_database(&config)
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        let shared = startup::build(config, database.config.clone())
            .await
            .map_err(|e| e.to_string())?;
        log::info(
            "mana-sync listening",
            &[
                (
                    "addr",
                    listener
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default()
                        .into(),
                ),
                (
                    "scheme",
                    if shared.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    }
                    .into(),
                ),
            ],
        );
        server::serve(listener, shared, server::shutdown_signal()).await;
        Ok(())
    }
    .await;
    if let Some(embedded) = database.embedded {
        log::info("stopping the embedded PostgreSQL", &[]);
        if let Err(e) = embedded.stop().await {
            log::error(
                "embedded PostgreSQL did not stop cleanly",
                &[("error", e.to_string().into())],
            );
        }
    }
    log::info("mana-sync stopped", &[]);
    result
}

async fn migrate() -> Result<(), String> {
    let config = config()?;
    let database = startup::open_database(&config)
        .await
        .map_err(|e| e.to_string())?;
    let store = mana_sync::store::Store::new(
        database.config.clone(),
        &mana_sync::store::StoreOptions {
            pool_size: 1,
            acquire_timeout: config.db_acquire_timeout,
            retention: config.log_retention,
            known_users: 0,
            max_per_user: 1,
            statement_timeout: None,
            max_future_skew: std::time::Duration::from_secs(86_400),
            page_max_bytes: 4 << 20,
            push_groups: (0, 0, 0),
        },
    );
    let outcome = startup::migrate(&store).await.map_err(|e| e.to_string());
    store.close();
    if let Some(embedded) = database.embedded {
        let _ = embedded.stop().await;
    }
    outcome.map(|outcome| println!("schema: {outcome:?}"))
}

fn keygen(rest: &[String]) -> Result<(), String> {
    let mut options = Options::parse(rest, &["--dir"], KEYGEN_USAGE)?;
    let dir = match options.take("--dir") {
        Some(dir) => PathBuf::from(dir),
        None => config()?.data_dir,
    };
    let (key, jwks) = devkeys::write_dev_keys(&dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            format!(
                "a key already exists in {} (remove it to make a new one)",
                dir.display()
            )
        }
        _ => format!("cannot write keys to {}: {e}", dir.display()),
    })?;
    println!(
        "private key: {}\npublic JWKS: {}",
        key.display(),
        jwks.display()
    );
    Ok(())
}

fn token(rest: &[String]) -> Result<(), String> {
    let mut options = Options::parse(rest, &["--sub", "--ttl", "--key"], TOKEN_USAGE)?;
    let config = config()?;
    let sub = options
        .take("--sub")
        .ok_or_else(|| format!("--sub is required\n\n{TOKEN_USAGE}"))?;
    let ttl = devkeys::parse_ttl(&options.take("--ttl").unwrap_or_else(|| "15m".into()))
        .map_err(|e| format!("--ttl: {e}"))?;
    let key_path = options
        .take("--key")
        .map(PathBuf::from)
        .unwrap_or_else(|| config.data_dir.join(devkeys::SIGNING_KEY_FILE));
    let (kid, key) = devkeys::load_signing_key(&key_path).map_err(|e| {
        format!(
            "cannot read the signing key {}: {e} (run `mana-sync keygen` first)",
            key_path.display()
        )
    })?;
    let now = mana_sync::clock::unix_now();
    let token = devkeys::mint_token(
        &kid,
        &key,
        &sub,
        ttl,
        config.jwt_issuer.as_deref(),
        config.jwt_audience.as_deref(),
        now,
    );
    println!("{token}");
    Ok(())
}

fn healthcheck(rest: &[String]) -> Result<(), String> {
    let mut options = Options::parse(rest, &["--url"], HEALTHCHECK_USAGE)?;
    let (url, tls) =
        match options.take("--url") {
            Some(url) => (url, mana_sync::client_tls::OutboundTls::web_roots().ureq()),
            None => {
                let config = config()?;
                match config.tls {
                    None => (
                        format!("http://127.0.0.1:{}/health", config.port),
                        config.outbound_tls.ureq(),
                    ),
                    // The server's own HTTPS port, over loopback: its certificate names the public host, not
                    // 127.0.0.1, and this probe asks whether the process answers, not who it is.
                    Some(_) => (
                        format!("https://127.0.0.1:{}/health", config.port),
                        ureq::tls::TlsConfig::builder()
                            .provider(ureq::tls::TlsProvider::Rustls)
                            .unversioned_rustls_crypto_provider(
                                mana_sync::client_tls::crypto_provider(),
                            )
                            .disable_verification(true)
                            .build(),
                    ),
                }
            }
        };
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(5)))
            .http_status_as_error(false)
            .tls_config(tls)
            .build(),
    );
    match agent.get(&url).call() {
        Ok(response) if response.status().as_u16() == 200 => Ok(()),
        Ok(response) => Err(format!("{url} answered {}", response.status().as_u16())),
        Err(e) => Err(format!("{url}: {e}")),
    }
}

/// `--name value` pairs, each allowed at most once.
struct Options(Vec<(String, String)>);

impl Options {
    fn parse(args: &[String], allowed: &[&str], usage: &str) -> Result<Options, String> {
        let mut pairs = Vec::new();
        let mut args = args.iter();
        while let Some(name) = args.next() {
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (name.clone(), None),
            };
            if !allowed.contains(&name.as_str()) {
                return Err(format!("unexpected argument {name:?}\n\n{usage}"));
            }
            let value = match value.or_else(|| args.next().cloned()) {
                Some(v) => v,
                None => return Err(format!("{name} needs a value\n\n{usage}")),
            };
            if pairs.iter().any(|(n, _)| n == &name) {
                return Err(format!("{name} given twice"));
            }
            pairs.push((name, value));
        }
        Ok(Options(pairs))
    }

    fn take(&mut self, name: &str) -> Option<String> {
        let index = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.remove(index).1)
    }
}
