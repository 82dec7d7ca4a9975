//! Compaction: log rows older than the retention horizon are folded into the record state and pruned.

use super::records;
use super::timestamp::PgTimestamp;
use super::user_tx::{Lock, UserTx};
use super::{rollback, Store, StoreError, MIGRATION_LOCK_CLASS};
use crate::protocol::time::Micros;

/// Deletes the oldest log rows of a user before a cutoff, at most $3 of them.
const PRUNE: &str = concat!(
    "DELETE FROM sync_changes WHERE id IN (SELECT id FROM sync_changes WHERE user_id = $1 AND created_at < $2 ",
    "ORDER BY created_at LIMIT $3)"
);
/// Pruning stays this far behind the horizon that reads use, so that instances whose clocks differ by less
/// never prune rows another instance still serves from the log.
const PRUNE_MARGIN_MICROS: Micros = 5 * 60 * 1_000_000;

impl Store {
    /// Prunes one user's log rows older than the retention horizon (minus a safety margin for clock skew
    /// between instances), in bounded batches, after folding them into the record state. Runs under the
    /// user's exclusive lock, so it never interleaves with a read of that user. Returns rows pruned.
    pub async fn compact_user(&self, user: &str, batch: i64) -> Result<u64, StoreError> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        let cutoff = PgTimestamp(
            crate::clock::now_micros() - retention.as_micros() as Micros - PRUNE_MARGIN_MICROS,
        );
        let mut pruned = 0;
        loop {
            let mut connection = self.pool.get().await?;
            let deleted = async {
                let (tx, ()) =
                    UserTx::begin(&mut connection, user, Lock::Exclusive, async |_| Ok(())).await?;
                records::fold_pending(tx.client(), user, self.future_skew).await?;
                let deleted = tx
                    .client()
                    .execute(PRUNE, &[&user, &cutoff, &batch])
                    .await?;
                tx.commit().await?;
                Ok::<u64, StoreError>(deleted)
            }
            .await;
            let deleted = match deleted {
                Ok(deleted) => deleted,
                Err(error) => {
                    rollback(&mut connection).await;
                    return Err(error);
                }
            };
            pruned += deleted;
            if deleted < batch as u64 {
                return Ok(pruned);
            }
        }
    }

    /// Users known to the clock table after `after`, in order (compaction walks them in slices).
    pub async fn users_after(&self, after: &str, limit: i64) -> Result<Vec<String>, StoreError> {
        let connection = self.pool.get().await?;
        let rows = connection
            .client()
            .query(
                "SELECT user_id FROM sync_user_clock WHERE user_id > $1 ORDER BY user_id LIMIT $2",
                &[&after, &limit],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Runs one compaction pass over every user if no other instance is running one (single-flight through a
    /// session advisory lock on a connection of its own, released when it closes). Returns rows pruned, or
    /// `None` when another instance holds the lock or no retention is configured.
    pub async fn compact(&self, batch: i64) -> Result<Option<u64>, StoreError> {
        if self.retention.is_none() {
            return Ok(None);
        }
        let (leader, connection) = self.connect_dedicated("mana-sync compaction").await?;
        let driver = tokio::spawn(connection);
        let result = async {
            let row = leader
                .query_one(
                    "SELECT pg_try_advisory_lock($1, 2)",
                    &[&MIGRATION_LOCK_CLASS],
                )
                .await?;
            if !row.get::<_, bool>(0) {
                return Ok(None);
            }
            let mut pruned = 0;
            let mut after = String::new();
            loop {
                let users = self.users_after(&after, 500).await?;
                for user in &users {
                    pruned += self.compact_user(user, batch).await?;
                }
                match users.last() {
                    Some(last) if users.len() == 500 => after = last.clone(),
                    _ => return Ok(Some(pruned)),
                }
            }
        }
        .await;
        drop(leader);
        let _ = driver.await;
        result
    }

    pub(super) fn horizon(&self) -> Option<Micros> {
        self.retention
            .map(|retention| crate::clock::now_micros() - retention.as_micros() as Micros)
    }
}
