//! `UserTx`: the one way a request enters a user's rows.
//!
//! Every read and write of one user's rows runs in a transaction that first declares the user to row-level
//! security (`app.current_user_id`) and takes the user's advisory lock: shared for log reads, exclusive for
//! pushes, snapshots and compaction (ARCHITECTURE.md, "The cursor guarantee"). The lock is a statement of
//! its own, so the snapshot of every statement after it is taken under the lock. `BEGIN`, the lock and the
//! transaction's first reads leave in one flush (tokio-postgres sends requests in the order their futures
//! are first polled; `try_join!(biased; …)` polls in order), and so do the last statements and `COMMIT`.
//!
//! The connection is marked while the transaction may be open: a request cancelled midway drops it
//! marked, and the pool closes it instead of lending it out inside a transaction. A failed transaction is
//! rolled back by whoever owns the connection (`super::rollback`), after the `UserTx` is gone.

use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::{PooledConnection, StoreError};

/// The advisory lock class of a user's lock (`hashtext(user_id)` is the key). The schema's triggers take
/// the same lock for direct writers (schema.sql), and push groups try it (group.rs).
macro_rules! user_lock_class {
    () => {
        "1398361667"
    };
}
pub(super) use user_lock_class;
/// `user_lock_class!()` as a number ("SYNC" in ASCII).
pub const USER_LOCK_CLASS: i32 = 0x5359_4E43;

/// Waiting for the user's lock (held by another instance or a direct writer) ends after this, with
/// SQLSTATE 55P03 (contention: 503 + Retry-After). It also bounds every other lock wait of the transaction.
macro_rules! lock_timeout {
    () => {
        "set_config('lock_timeout', '5000', true)"
    };
}

/// Declares the user and takes the shared lock: log reads, which only need every write of the user that
/// started before them to have committed.
const LOCK_SHARED: &str = concat!(
    "SELECT set_config('app.current_user_id', $1, true), ",
    lock_timeout!(),
    ", pg_advisory_xact_lock_shared(",
    user_lock_class!(),
    ", hashtext($1))"
);
/// Declares the user and takes the exclusive lock: snapshots (which fold first) and compaction.
const LOCK_EXCLUSIVE: &str = concat!(
    "SELECT set_config('app.current_user_id', $1, true), ",
    lock_timeout!(),
    ", pg_advisory_xact_lock(",
    user_lock_class!(),
    ", hashtext($1))"
);
/// A push's lock: exclusive, and "this transaction stamps its own rows" for the schema's triggers (their
/// `WHEN` skips them, so no PL/pgSQL runs for our inserts).
const LOCK_PUSH: &str = concat!(
    "SELECT set_config('app.current_user_id', $1, true), set_config('mana_sync.stamped', 'on', true), ",
    lock_timeout!(),
    ", pg_advisory_xact_lock(",
    user_lock_class!(),
    ", hashtext($1))"
);
/// Declares the user without locking: tools and tests that look at a user's rows the way the server does.
const DECLARE_ONLY: &str = "SELECT set_config('app.current_user_id', $1, true)";

/// Which of the user's locks a transaction holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Lock {
    Shared,
    Exclusive,
    Push,
    /// No lock: only for reads that vouch for no cursor (`Store::with_user_transaction`).
    None,
}

impl Lock {
    fn sql(self) -> &'static str {
        match self {
            Lock::Shared => LOCK_SHARED,
            Lock::Exclusive => LOCK_EXCLUSIVE,
            Lock::Push => LOCK_PUSH,
            Lock::None => DECLARE_ONLY,
        }
    }
}

/// An open transaction of one user, holding the user's lock.
pub(super) struct UserTx<'c> {
    connection: &'c mut PooledConnection,
}

impl<'c> UserTx<'c> {
    /// `BEGIN`, the user and the lock, then `first` (the transaction's first reads, whose snapshot is taken
    /// under the lock): one flush. `first` gets the client and must send every request on its first poll:
    /// statements prepared beforehand (`PooledConnection::prepare`), joined rather than awaited in turn.
    pub(super) async fn begin<T>(
        connection: &'c mut PooledConnection,
        user: &str,
        lock: Lock,
        first: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<(UserTx<'c>, T), StoreError> {
        let lock = connection.prepare(lock.sql()).await?;
        connection.in_transaction = true;
        let client = connection.client();
        let user_param: [&(dyn ToSql + Sync); 1] = [&user];
        let (_, _, first) = tokio::try_join!(
            biased;
            client.batch_execute("BEGIN"),
            client.execute(&lock, &user_param),
            first(client),
        )?;
        Ok((UserTx { connection }, first))
    }

    /// A whole short transaction in one flush: `BEGIN`, the user and the lock, `reads`, `COMMIT`. `reads`
    /// must send every request on its first poll (prepared statements, joined): a request sent later
    /// would run after the `COMMIT`, outside the transaction and without the user.
    pub(super) async fn in_one_flush<T>(
        connection: &'c mut PooledConnection,
        user: &str,
        lock: Lock,
        reads: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        let lock = connection.prepare(lock.sql()).await?;
        connection.in_transaction = true;
        let client = connection.client();
        let user_param: [&(dyn ToSql + Sync); 1] = [&user];
        let (_, _, read, _) = tokio::try_join!(
            biased;
            client.batch_execute("BEGIN"),
            client.execute(&lock, &user_param),
            reads(client),
            client.batch_execute("COMMIT"),
        )?;
        connection.in_transaction = false;
        Ok(read)
    }

    /// The transaction's client, for the statements between the first and the last flush.
    pub(super) fn client(&self) -> &Client {
        self.connection.client()
    }

    /// Prepares (or finds in the connection's cache) a statement for use inside the transaction.
    pub(super) async fn prepare(
        &mut self,
        sql: &'static str,
    ) -> Result<tokio_postgres::Statement, StoreError> {
        Ok(self.connection.prepare(sql).await?)
    }

    /// `last` (the transaction's last statements) and `COMMIT`: one flush; `last` must send every request
    /// on its first poll, as for `in_one_flush`.
    pub(super) async fn commit_after<T>(
        self,
        last: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        let client = self.connection.client();
        let (done, _) = tokio::try_join!(biased; last(client), client.batch_execute("COMMIT"))?;
        self.connection.in_transaction = false;
        Ok(done)
    }

    pub(super) async fn commit(self) -> Result<(), StoreError> {
        self.commit_after(async |_| Ok(())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_class_is_one_number_everywhere() {
        assert_eq!(user_lock_class!(), USER_LOCK_CLASS.to_string());
        // Direct writers take the same lock through the schema's trigger.
        let trigger_lock = concat!(
            "pg_advisory_xact_lock(",
            user_lock_class!(),
            ", hashtext(NEW.user_id))"
        );
        assert!(super::super::SCHEMA_SQL.contains(trigger_lock));
        for lock in [Lock::Shared, Lock::Exclusive, Lock::Push] {
            assert!(lock
                .sql()
                .contains(concat!(user_lock_class!(), ", hashtext($1))")));
        }
    }
}
