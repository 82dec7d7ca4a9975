//! Connection strings, connecting, and the role and database the server uses.

use std::path::Path;

use super::{DevDbError, APP_ROLE};

/// Quotes a libpq key/value connection parameter when needed.
pub(super) fn conn_value(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

pub(super) fn conn_string(socket_dir: &Path, user: &str, dbname: &str) -> String {
    format!(
        "host={} user={} dbname={}",
        conn_value(&socket_dir.to_string_lossy()),
        conn_value(user),
        conn_value(dbname)
    )
}

pub(super) fn sql_err(context: &str, e: tokio_postgres::Error) -> DevDbError {
    match e.as_db_error() {
        Some(db) => DevDbError::Setup(format!("{context}: {}", db.message())),
        None => DevDbError::Setup(format!("{context}: {e}")),
    }
}

/// Connects without TLS (a Unix socket of an embedded cluster) and spawns the
/// connection task: the one "connect and drive the connection" helper of the
/// crate's development and test code (tests and `bench/` use it too).
pub async fn connect(conn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    // The connection future drives the socket; it ends when the client drops.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Creates database `name` owned by the app role unless it exists.
/// CREATE DATABASE cannot run inside a transaction, hence check-then-create;
/// a concurrent creator winning the race shows up as duplicate_database
/// (42P04) or a unique violation on pg_database (23505), both fine.
pub(super) async fn ensure_database(
    su: &tokio_postgres::Client,
    name: &str,
    fail_if_exists: bool,
) -> Result<(), DevDbError> {
    let exists = su
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .map_err(|e| sql_err("checking pg_database", e))?
        .is_some();
    if exists {
        if fail_if_exists {
            return Err(DevDbError::Setup(format!("database {name} already exists")));
        }
        return Ok(());
    }
    let stmt = format!("CREATE DATABASE {name} OWNER {APP_ROLE}");
    match su.batch_execute(&stmt).await {
        Ok(()) => Ok(()),
        Err(e) if !fail_if_exists && is_duplicate(&e) => Ok(()),
        Err(e) => Err(sql_err(&format!("creating database {name}"), e)),
    }
}

pub(super) fn is_duplicate(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(
        e.code(),
        Some(c) if *c == SqlState::DUPLICATE_DATABASE
            || *c == SqlState::DUPLICATE_OBJECT
            || *c == SqlState::UNIQUE_VIOLATION
    )
}

/// Creates the application role unless it exists, and re-asserts the
/// privilege boundary in case someone widened it by hand: development must
/// hit the same permission errors as production.
pub(super) async fn ensure_app_role(su: &tokio_postgres::Client) -> Result<(), DevDbError> {
    let role_exists = su
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&APP_ROLE])
        .await
        .map_err(|e| sql_err("checking pg_roles", e))?
        .is_some();
    if !role_exists {
        let stmt = format!("CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS");
        match su.batch_execute(&stmt).await {
            Ok(()) => {}
            Err(e) if is_duplicate(&e) => {}
            Err(e) => return Err(sql_err("creating role mana_sync", e)),
        }
    }
    su.batch_execute(&format!(
        "ALTER ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE"
    ))
    .await
    .map_err(|e| sql_err("configuring role mana_sync", e))
}
