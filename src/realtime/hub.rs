//! The hub: who is connected, and telling them that something changed.
//!
//! Connections (WebSockets and SSE streams) register under their user id. The registry is sharded by user
//! id, each shard behind its own lock, so registering, unregistering and notifying touch only the shard of
//! the user involved and never wait on unrelated users. Nothing here awaits I/O: `notify` only puts a hint
//! into each connection's queue and wakes its task; the task does the (possibly slow) socket writes.
//!
//! Every connection's queue is bounded. Hints for the same app coalesce (their table lists merge) while
//! they wait, so a burst of pushes to one app costs one message. A hint that finds the queue full and
//! cannot coalesce closes the connection ("slow consumer"): its client reconnects and pulls, which is
//! cheaper than buffering without bound.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Which notifications a connection wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Interest {
    /// Every app (unified WebSocket, unified stream with these apps or all when empty).
    Apps(Option<BTreeSet<String>>),
    /// One app only (legacy WebSocket, per-app stream).
    App(String),
}

impl Interest {
    fn wants(&self, app: &str) -> bool {
        match self {
            Interest::Apps(None) => true,
            Interest::Apps(Some(apps)) => apps.contains(app),
            Interest::App(only) => only == app,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Socket,
    Stream,
}

/// Something changed for the user in `app`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hint {
    /// These tables of this app changed (`None`: which tables is not known).
    Changed {
        app: String,
        tables: Option<BTreeSet<String>>,
    },
    /// Notifications may have been missed (the cross-instance listener reconnected): pull everything.
    Resync,
}

/// Why the hub closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evicted {
    SlowConsumer,
}

#[derive(Debug, Default)]
struct Queue {
    hints: Vec<Hint>,
    /// When the oldest waiting hint was queued (for the delivery-latency metric).
    since: Option<std::time::Instant>,
    evicted: Option<Evicted>,
}

/// One registered connection.
pub(crate) struct Subscriber {
    pub(crate) id: u64,
    pub(crate) user: String,
    pub(crate) kind: Kind,
    interest: Interest,
    /// The device this connection belongs to (`X-Client-Id`, `clientId`): its own pushes are not echoed.
    device: Mutex<Option<String>>,
    queue: Mutex<Queue>,
    wake: Notify,
}

impl Subscriber {
    /// Waits for hints and takes all of them (with the time the oldest was queued), or learns that the hub
    /// evicted this connection.
    pub(crate) async fn next_hints(&self) -> Result<(Vec<Hint>, std::time::Instant), Evicted> {
        loop {
            // Register interest before checking, so a notify between the check and the await is not lost.
            let woken = self.wake.notified();
            {
                let mut queue = self.queue.lock();
                if let Some(reason) = queue.evicted {
                    return Err(reason);
                }
                if !queue.hints.is_empty() {
                    let since = queue.since.take().unwrap_or_else(std::time::Instant::now);
                    return Ok((std::mem::take(&mut queue.hints), since));
                }
            }
            woken.await;
        }
    }

    /// The device id used for echo suppression; a WebSocket may set it late (in its auth message).
    pub(crate) fn set_device(&self, device: Option<String>) {
        *self.device.lock() = device;
    }
}

/// Counters for /health and /metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    pub(crate) notifications_queued: AtomicU64,
    pub(crate) notifications_coalesced: AtomicU64,
    pub(crate) notifications_dropped: AtomicU64,
    pub slow_consumers_closed: AtomicU64,
}

/// The connections of the users that hash to one shard.
type Shard = HashMap<String, Vec<Arc<Subscriber>>>;

pub struct Hub {
    shards: Box<[Mutex<Shard>]>,
    next_id: AtomicU64,
    queue_capacity: usize,
    max_connections_per_user: usize,
    pub stats: HubStats,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RegisterError {
    TooManyConnections { limit: usize },
}

/// Keeps a connection registered; unregisters it when dropped.
pub(crate) struct Registration {
    hub: Arc<Hub>,
    pub(crate) subscriber: Arc<Subscriber>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(&self.subscriber);
    }
}

const SHARDS: usize = 64;

impl Hub {
    pub(crate) fn new(queue_capacity: usize, max_connections_per_user: usize) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            queue_capacity: queue_capacity.max(1),
            max_connections_per_user,
            stats: HubStats::default(),
        }
    }

    fn shard(&self, user: &str) -> &Mutex<Shard> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        user.hash(&mut hasher);
        &self.shards[(hasher.finish() as usize) % self.shards.len()]
    }

    pub(crate) fn register(
        self: &Arc<Self>,
        user: &str,
        interest: Interest,
        kind: Kind,
        device: Option<String>,
    ) -> Result<Registration, RegisterError> {
        let subscriber = Arc::new(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            user: user.to_owned(),
            kind,
            interest,
            device: Mutex::new(device),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        });
        let mut shard = self.shard(user).lock();
        let connections = shard.entry(user.to_owned()).or_default();
        // One cap over WebSockets and streams together: either kind holds a socket and a task.
        if connections.len() >= self.max_connections_per_user {
            return Err(RegisterError::TooManyConnections {
                limit: self.max_connections_per_user,
            });
        }
        connections.push(subscriber.clone());
        Ok(Registration {
            hub: self.clone(),
            subscriber,
        })
    }

    fn unregister(&self, subscriber: &Subscriber) {
        let mut shard = self.shard(&subscriber.user).lock();
        if let Some(connections) = shard.get_mut(&subscriber.user) {
            connections.retain(|s| s.id != subscriber.id);
            if connections.is_empty() {
                shard.remove(&subscriber.user);
            }
        }
    }

    /// Tells every connection of `user` interested in `app` — except the device that made the change —
    /// that `tables` changed. More than `MAX_HINT_TABLES` tables become "this app changed" (`None`), so
    /// nothing queued per connection grows with the number of tables a push names.
    pub(crate) fn notify(
        &self,
        user: &str,
        app: &str,
        tables: Option<&BTreeSet<String>>,
        device: Option<&str>,
    ) {
        let tables = tables.filter(|tables| tables.len() <= MAX_HINT_TABLES);
        let shard = self.shard(user).lock();
        let Some(connections) = shard.get(user) else {
            return;
        };
        for subscriber in connections {
            if !subscriber.interest.wants(app) {
                continue;
            }
            if device.is_some() && subscriber.device.lock().as_deref() == device {
                continue;
            }
            self.enqueue(
                subscriber,
                Hint::Changed {
                    app: app.to_owned(),
                    tables: tables.cloned(),
                },
            );
        }
    }

    /// Tells every connection to pull everything: notifications may have been missed.
    pub(crate) fn resync_all(&self) {
        for shard in self.shards.iter() {
            for subscriber in shard.lock().values().flatten() {
                self.enqueue(subscriber, Hint::Resync);
            }
        }
    }

    fn enqueue(&self, subscriber: &Subscriber, hint: Hint) {
        let mut queue = subscriber.queue.lock();
        if queue.evicted.is_some() {
            return;
        }
        if coalesce(&mut queue.hints, &hint) {
            self.stats
                .notifications_coalesced
                .fetch_add(1, Ordering::Relaxed);
        } else if queue.hints.len() >= self.queue_capacity {
            queue.evicted = Some(Evicted::SlowConsumer);
            queue.hints.clear();
            self.stats
                .notifications_dropped
                .fetch_add(1, Ordering::Relaxed);
            self.stats
                .slow_consumers_closed
                .fetch_add(1, Ordering::Relaxed);
        } else {
            queue.hints.push(hint);
            self.stats
                .notifications_queued
                .fetch_add(1, Ordering::Relaxed);
        }
        drop(queue);
        subscriber.wake.notify_one();
    }

    /// Evicts a connection whose socket stopped accepting data (its task detected a write timeout).
    pub(crate) fn count_slow_consumer(&self) {
        self.stats
            .slow_consumers_closed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// (connections, distinct users) of one kind, or of all kinds when `kind` is `None`.
    pub fn counts(&self, kind: Option<Kind>) -> (usize, usize) {
        let mut connections = 0;
        let mut users = 0;
        for shard in self.shards.iter() {
            for subscribers in shard.lock().values() {
                let n = subscribers
                    .iter()
                    .filter(|s| kind.is_none_or(|k| s.kind == k))
                    .count();
                connections += n;
                users += usize::from(n > 0);
            }
        }
        (connections, users)
    }
}

/// A hint naming more tables than this says "this app changed" instead (clients then pull every
/// collection of the app).
pub const MAX_HINT_TABLES: usize = 256;

/// Merges `hint` into a waiting hint it can join; true when it did.
fn coalesce(waiting: &mut [Hint], hint: &Hint) -> bool {
    match hint {
        Hint::Resync => waiting.contains(&Hint::Resync),
        Hint::Changed { app, tables } => {
            for queued in waiting.iter_mut() {
                match queued {
                    Hint::Resync => return true,
                    Hint::Changed {
                        app: queued_app,
                        tables: queued_tables,
                    } if queued_app == app => {
                        match (queued_tables.as_mut(), tables) {
                            (Some(waiting), Some(tables))
                                if waiting.len() + tables.len() <= MAX_HINT_TABLES =>
                            {
                                waiting.extend(tables.iter().cloned())
                            }
                            _ => *queued_tables = None,
                        }
                        return true;
                    }
                    Hint::Changed { .. } => {}
                }
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[tokio::test]
    async fn notifies_only_interested_connections_of_that_user_and_never_the_pushing_device() {
        let hub = Arc::new(Hub::new(8, 10));
        let unified = hub
            .register(
                "u1",
                Interest::Apps(None),
                Kind::Socket,
                Some("dev-a".into()),
            )
            .unwrap();
        let legacy = hub
            .register(
                "u1",
                Interest::App("todo".into()),
                Kind::Socket,
                Some("dev-b".into()),
            )
            .unwrap();
        let other_user = hub
            .register("u2", Interest::Apps(None), Kind::Socket, None)
            .unwrap();
        hub.notify("u1", "calendar", Some(&tables(&["events"])), Some("dev-a"));
        hub.notify("u1", "todo", Some(&tables(&["tasks"])), None);
        assert_eq!(
            unified.subscriber.next_hints().await.unwrap().0,
            vec![Hint::Changed {
                app: "todo".into(),
                tables: Some(tables(&["tasks"]))
            }],
            "its own calendar change is not echoed"
        );
        assert_eq!(legacy.subscriber.next_hints().await.unwrap().0.len(), 1);
        assert!(other_user.subscriber.queue.lock().hints.is_empty());
        assert_eq!(hub.counts(None), (3, 2));
        drop(unified);
        drop(legacy);
        assert_eq!(hub.counts(None), (1, 1));
    }

    #[tokio::test]
    async fn hints_for_one_app_coalesce_and_a_full_queue_evicts() {
        let hub = Arc::new(Hub::new(2, 10));
        let socket = hub
            .register("u", Interest::Apps(None), Kind::Socket, None)
            .unwrap();
        for table in ["a", "b", "c"] {
            hub.notify("u", "todo", Some(&tables(&[table])), None);
        }
        hub.notify("u", "notes", None, None);
        hub.notify("u", "notes", Some(&tables(&["n"])), None);
        assert_eq!(
            socket.subscriber.next_hints().await.unwrap().0,
            vec![
                Hint::Changed {
                    app: "todo".into(),
                    tables: Some(tables(&["a", "b", "c"]))
                },
                Hint::Changed {
                    app: "notes".into(),
                    tables: None
                },
            ]
        );
        for app in ["x", "y", "z"] {
            hub.notify("u", app, None, None);
        }
        assert_eq!(
            socket.subscriber.next_hints().await,
            Err(Evicted::SlowConsumer)
        );
        assert_eq!(hub.stats.slow_consumers_closed.load(Ordering::Relaxed), 1);
        assert_eq!(hub.stats.notifications_coalesced.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn caps_sockets_and_streams_of_a_user_together() {
        let hub = Arc::new(Hub::new(2, 2));
        let _a = hub
            .register("u", Interest::Apps(None), Kind::Socket, None)
            .unwrap();
        let b = hub
            .register("u", Interest::Apps(None), Kind::Stream, None)
            .unwrap();
        for kind in [Kind::Socket, Kind::Stream] {
            assert_eq!(
                hub.register("u", Interest::Apps(None), kind, None).err(),
                Some(RegisterError::TooManyConnections { limit: 2 })
            );
        }
        assert!(hub
            .register("v", Interest::Apps(None), Kind::Socket, None)
            .is_ok());
        drop(b);
        assert!(hub
            .register("u", Interest::Apps(None), Kind::Stream, None)
            .is_ok());
    }

    #[tokio::test]
    async fn resync_reaches_everyone_once() {
        let hub = Arc::new(Hub::new(4, 4));
        let a = hub
            .register("u", Interest::App("todo".into()), Kind::Socket, None)
            .unwrap();
        let b = hub
            .register("v", Interest::Apps(None), Kind::Stream, None)
            .unwrap();
        hub.resync_all();
        hub.resync_all();
        hub.notify("u", "todo", None, None);
        assert_eq!(
            a.subscriber.next_hints().await.unwrap().0,
            vec![Hint::Resync]
        );
        assert_eq!(
            b.subscriber.next_hints().await.unwrap().0,
            vec![Hint::Resync]
        );
    }
}
