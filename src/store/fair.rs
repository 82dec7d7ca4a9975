//! Per-user shares of the database (issue "fair share"): before a request takes one of the pool's
//! connections it takes one of its user's `per_user` slots, and a push first takes its user's writer slot.
//!
//! Pushes of one user are serialised by PostgreSQL anyway (the user's exclusive advisory lock); waiting
//! for that lock while holding a pooled connection let one user's burst of pushes hold the whole pool. Here
//! they queue in the process, holding nothing shared; the advisory lock remains for other instances and
//! direct writers. Entries exist only while someone holds or waits for them.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::StoreError;

const SHARDS: usize = 16;

/// Users (with someone holding or waiting for their slots) and their slots.
type Shard = Mutex<HashMap<String, Arc<Slots>>>;

pub(crate) struct UserSlots {
    shards: Box<[Shard]>,
    per_user: usize,
    hasher: std::collections::hash_map::RandomState,
}

struct Slots {
    writer: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

/// A user's claim on the database: released (and the entry dropped when unused) on drop.
pub(crate) struct UserPermit<'a> {
    slots: &'a UserSlots,
    user: String,
    entry: Option<Arc<Slots>>,
    writer: Option<OwnedSemaphorePermit>,
    connection: Option<OwnedSemaphorePermit>,
}

impl UserSlots {
    pub(crate) fn new(per_user: usize) -> UserSlots {
        UserSlots {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_user: per_user.max(1),
            hasher: Default::default(),
        }
    }

    fn shard(&self, user: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(user) as usize) % SHARDS]
    }

    /// Waits (until `deadline`) for the user's writer slot if `write`, then for one of its connection
    /// slots. `Saturated` when the deadline passes first.
    pub(crate) async fn acquire(
        &self,
        user: &str,
        write: bool,
        deadline: Instant,
    ) -> Result<UserPermit<'_>, StoreError> {
        let entry = self
            .shard(user)
            .lock()
            .entry(user.to_owned())
            .or_insert_with(|| {
                Arc::new(Slots {
                    writer: Arc::new(Semaphore::new(1)),
                    connections: Arc::new(Semaphore::new(self.per_user)),
                })
            })
            .clone();
        let mut permit = UserPermit {
            slots: self,
            user: user.to_owned(),
            entry: Some(entry.clone()),
            writer: None,
            connection: None,
        };
        let wait = async {
            if write {
                permit.writer = Some(entry.writer.clone().acquire_owned().await.ok()?);
            }
            permit.connection = Some(entry.connections.clone().acquire_owned().await.ok()?);
            Some(())
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Some(())) => Ok(permit),
            _ => Err(StoreError::Saturated),
        }
    }

    /// Users with an entry (holding or waiting), for tests and metrics.
    pub(crate) fn users(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

impl Drop for UserPermit<'_> {
    fn drop(&mut self) {
        self.writer.take();
        self.connection.take();
        let Some(entry) = self.entry.take() else {
            return;
        };
        let mut shard = self.slots.shard(&self.user).lock();
        // The map's reference and ours: nobody else holds or waits for this user's slots.
        if Arc::strong_count(&entry) == 2 {
            shard.remove(&self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn writers_of_one_user_queue_and_connections_are_capped_per_user() {
        let slots = UserSlots::new(2);
        let soon = || Instant::now() + Duration::from_millis(50);
        let writer = slots.acquire("a", true, soon()).await.unwrap();
        assert!(
            matches!(
                slots.acquire("a", true, soon()).await,
                Err(StoreError::Saturated)
            ),
            "a second writer of the same user waits"
        );
        let reader = slots.acquire("a", false, soon()).await.unwrap();
        assert!(
            matches!(
                slots.acquire("a", false, soon()).await,
                Err(StoreError::Saturated)
            ),
            "two connections per user at most"
        );
        // Other users are not affected.
        let other = slots.acquire("b", true, soon()).await.unwrap();
        drop((writer, reader, other));
        assert_eq!(slots.users(), 0, "unused entries are dropped");
        let _again = slots.acquire("a", true, soon()).await.unwrap();
        assert_eq!(slots.users(), 1);
    }
}
