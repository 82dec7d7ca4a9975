//! What this instance knows about each user's clock: the memory that answers "nothing new" without
//! touching PostgreSQL (ARCHITECTURE.md, "Answering from memory").
//!
//! Per user it keeps `known`, a value the user's clock (`sync_user_clock.last_at`) has had. Two facts make
//! an answer from it safe:
//!
//! * **Safety** — the clock only grows, so `known <= clock` forever, and every later write is stamped after
//!   `clock`. A read whose `since` equals `known` may therefore answer "nothing new, `syncedUntil` =
//!   `since`": it hands out no cursor that a later write could fall behind, and it does not move the
//!   device's cursor at all, so even a wrong "nothing new" could only delay a change, never skip it.
//! * **Freshness** — every committed stamp above `known` has its hint still on its way to this instance:
//!   PostgreSQL delivers `NOTIFY` at commit, in commit order, and per user commit order is stamp order (the
//!   exclusive lock is held until commit). Each hint raises `known` to its stamp before the local
//!   connections are told, so a device that was told "sync available" never gets the old answer.
//!
//! The second fact needs care wherever an entry is created rather than raised, because an entry created
//! from a database read that started before a hint was processed would forget that hint. So entries learnt
//! from the database carry a `Ticket` taken before the read; the ticket is void once its shard evicted or
//! was cleared, and a void ticket may still raise an entry that exists but never creates one. Raising an
//! existing entry is always safe (a larger `known` is still a clock value, and stamps above it still have
//! their hints pending). Hints create entries freely: they arrive in stamp order, so the newest one is at
//! least every stamp processed before it.
//!
//! A hint arrives a moment after its commit. So that a read which starts after a commit has returned (to a
//! direct writer, or to a push on another instance) still sees it, an answer from memory first waits for
//! the listener to catch up (`caught_up`): one round trip on the listening connection, shared by every read
//! waiting at that moment. PostgreSQL sends a listener every notification already committed before it
//! answers its next query, so after that round trip every such hint has raised its entry.
//!
//! Whenever the listener is down hints may be lost, so the whole memory is dropped and stays off until the
//! listener is back (`listener_down` / `listener_up`).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use crate::protocol::time::Micros;

const SHARDS: usize = 64;

pub struct KnownStamps {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    /// True while the listener is connected: hints flow, so the memory may answer.
    live: AtomicBool,
    hasher: std::collections::hash_map::RandomState,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Catch-up requests: numbered, the listener answers all up to the number it saw before its round trip.
    requested: AtomicU64,
    caught_up_to: watch::Sender<u64>,
    wake_listener: Notify,
}

/// How long a read waits for the listener to catch up before it asks the database instead.
const CATCH_UP_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Shard {
    stamps: HashMap<String, Micros>,
    /// Bumped whenever an entry of this shard is forgotten (eviction, clear).
    generation: u64,
}

/// Taken before a database read; lets what the read learnt create an entry only if nothing was forgotten
/// in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    shard: usize,
    generation: u64,
}

impl KnownStamps {
    /// `capacity` users at most (0 turns the memory off: every read goes to the database).
    pub(crate) fn new(capacity: usize) -> KnownStamps {
        KnownStamps {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: capacity.div_ceil(SHARDS),
            live: AtomicBool::new(false),
            hasher: Default::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            caught_up_to: watch::Sender::new(0),
            wake_listener: Notify::new(),
        }
    }

    fn shard_of(&self, user: &str) -> usize {
        (self.hasher.hash_one(user) as usize) % SHARDS
    }

    /// True when the memory knows that nothing of `user` was committed after `since` — as far as the hints
    /// processed so far tell (see `answers`).
    pub fn nothing_after(&self, user: &str, since: Micros) -> bool {
        self.live.load(Ordering::Acquire)
            && self.shards[self.shard_of(user)].lock().stamps.get(user) == Some(&since)
    }

    /// True when nothing of `user` was committed after `since` before this call: `nothing_after`, checked
    /// again once every hint committed before the call has been processed.
    pub(crate) async fn answers(&self, user: &str, since: Micros) -> bool {
        let fresh = self.nothing_after(user, since)
            && self.caught_up().await
            && self.nothing_after(user, since);
        let counter = if fresh { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        fresh
    }

    /// Waits until the listener has processed every notification committed before this call (false if
    /// it does not within `CATCH_UP_TIMEOUT`, or the memory is off).
    async fn caught_up(&self) -> bool {
        let mine = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        self.wake_listener.notify_one();
        let mut progress = self.caught_up_to.subscribe();
        let waited =
            tokio::time::timeout(CATCH_UP_TIMEOUT, progress.wait_for(|&done| done >= mine));
        matches!(waited.await, Ok(Ok(_))) && self.live.load(Ordering::Acquire)
    }

    /// For the listener: waits for catch-up requests; returns the newest one. The listener then makes a
    /// round trip on its connection, processes every hint received before the answer, and calls
    /// `caught_up_to` with this number.
    pub(crate) async fn catch_up_requested(&self) -> u64 {
        loop {
            let requested = self.requested.load(Ordering::Acquire);
            if requested > *self.caught_up_to.borrow() {
                return requested;
            }
            self.wake_listener.notified().await;
        }
    }

    /// For the listener: requests up to `request` are answered.
    pub(crate) fn caught_up_to(&self, request: u64) {
        self.caught_up_to
            .send_modify(|done| *done = (*done).max(request));
    }

    /// To be taken before a database read whose result will be `learn`t.
    pub fn ticket(&self, user: &str) -> Option<Ticket> {
        if !self.live.load(Ordering::Acquire) || self.per_shard == 0 {
            return None;
        }
        let shard = self.shard_of(user);
        let generation = self.shards[shard].lock().generation;
        Some(Ticket { shard, generation })
    }

    /// A clock value read under the user's lock (or committed by this instance): raises the entry, or
    /// creates it when the ticket is still valid.
    pub(crate) fn learn(&self, user: &str, ticket: Option<Ticket>, clock: Micros) {
        let Some(ticket) = ticket else { return };
        let mut shard = self.shards[ticket.shard].lock();
        if let Some(known) = shard.stamps.get_mut(user) {
            *known = (*known).max(clock);
        } else if shard.generation == ticket.generation && self.live.load(Ordering::Acquire) {
            self.insert(&mut shard, user, clock);
        }
    }

    /// A hint's stamp: a commit of `user` at `stamp`. Must run before the local connections hear of it.
    pub(crate) fn observe(&self, user: &str, stamp: Micros) {
        if !self.live.load(Ordering::Acquire) || self.per_shard == 0 {
            return;
        }
        let mut shard = self.shards[self.shard_of(user)].lock();
        match shard.stamps.get_mut(user) {
            Some(known) => *known = (*known).max(stamp),
            None => self.insert(&mut shard, user, stamp),
        }
    }

    /// A hint without a stamp (from an older server): forget the user, so the next read asks PostgreSQL.
    pub(crate) fn forget(&self, user: &str) {
        let mut shard = self.shards[self.shard_of(user)].lock();
        if shard.stamps.remove(user).is_some() {
            shard.generation += 1;
        }
    }

    fn insert(&self, shard: &mut Shard, user: &str, stamp: Micros) {
        if shard.stamps.len() >= self.per_shard {
            // Any entry will do: an evicted user only costs one database read. The hash map's iteration
            // order is as good as random here.
            if let Some(victim) = shard.stamps.keys().next().cloned() {
                shard.stamps.remove(&victim);
            }
            shard.generation += 1;
        }
        shard.stamps.insert(user.to_owned(), stamp);
    }

    /// The listener lost its connection: hints may be lost from now on.
    pub(crate) fn listener_down(&self) {
        self.live.store(false, Ordering::Release);
        self.clear();
    }

    /// The listener is connected (its `LISTEN` is in effect): every later commit's hint will arrive.
    pub(crate) fn listener_up(&self) {
        self.clear();
        self.live.store(true, Ordering::Release);
    }

    fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.stamps.clear();
            shard.generation += 1;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().stamps.len()).sum()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (reads answered from memory, reads that went to the database).
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    fn live(capacity: usize) -> KnownStamps {
        let known = KnownStamps::new(capacity);
        known.listener_up();
        known
    }

    #[test]
    fn answers_only_for_the_exact_known_stamp_while_live() {
        let known = KnownStamps::new(100);
        let ticket = known.ticket("u");
        assert_eq!(ticket, None, "no memory before the listener is up");
        known.learn("u", ticket, 10);
        assert!(!known.nothing_after("u", 10));

        known.listener_up();
        let ticket = known.ticket("u");
        known.learn("u", ticket, 10);
        assert!(known.nothing_after("u", 10));
        assert!(
            !known.nothing_after("u", 9),
            "older cursor: there is something to read"
        );
        assert!(
            !known.nothing_after("u", 11),
            "a cursor ahead of the clock must reach the database"
        );
        assert!(!known.nothing_after("v", 10));

        known.observe("u", 15);
        assert!(
            !known.nothing_after("u", 10),
            "a hint makes the old cursor stale"
        );
        known.learn("u", known.ticket("u"), 12);
        assert!(known.nothing_after("u", 15), "entries only grow");

        known.listener_down();
        assert!(!known.nothing_after("u", 15));
        known.observe("u", 20);
        assert!(
            known.is_empty(),
            "hints are ignored while the memory is off"
        );
    }

    #[test]
    fn a_read_that_started_before_a_forgotten_hint_creates_nothing() {
        let known = live(100);
        let ticket = known.ticket("u"); // a read starts and sees the clock at 10
        known.observe("u", 20); // a commit at 20 is announced ...
        known.forget("u"); // ... and forgotten (eviction or an unstamped hint)
        known.learn("u", ticket, 10); // the read ends
        assert!(!known.nothing_after("u", 10), "would hide the commit at 20");
        assert!(known.is_empty());

        // The same read with its entry still present only raises it.
        let ticket = known.ticket("u");
        known.observe("u", 20);
        known.learn("u", ticket, 10);
        assert!(known.nothing_after("u", 20));
    }

    #[test]
    fn reconnecting_voids_tickets_taken_before() {
        let known = live(100);
        let ticket = known.ticket("u");
        known.listener_down();
        known.listener_up();
        known.learn("u", ticket, 10);
        assert!(known.is_empty());
    }

    #[test]
    fn the_bound_holds_and_eviction_voids_tickets() {
        let known = live(640);
        for i in 0..10_000 {
            known.observe(&format!("user-{i}"), i);
            assert!(known.len() <= 640);
        }
        // Fill one shard, take a ticket for an absent user there, then evict: the ticket is void.
        let ticket = known.ticket("late").unwrap();
        let shard = ticket.shard;
        let mut i = 0;
        loop {
            let user = format!("filler-{i}");
            i += 1;
            if known.shard_of(&user) == shard {
                known.observe(&user, 1);
                if known.shards[shard].lock().generation != ticket.generation {
                    break;
                }
            }
        }
        known.learn("late", Some(ticket), 5);
        assert!(!known.nothing_after("late", 5));
    }

    #[test]
    fn zero_capacity_turns_the_memory_off() {
        let known = live(0);
        known.observe("u", 1);
        known.learn("u", known.ticket("u"), 1);
        assert!(!known.nothing_after("u", 1));
    }

    /// Randomized model check: commits, hints (delayed), reads (seeded with a ticket), evictions and
    /// reconnects interleave; whenever the memory says "nothing after since", no commit newer than
    /// `since` may have had its hint processed or lost, and `since` is never ahead of the clock.
    #[test]
    fn never_hides_a_processed_hint() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..200 {
            let known = live(64 * 2);
            let users: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
            let mut clock = vec![0i64; users.len()];
            let mut processed = vec![0i64; users.len()]; // newest stamp whose hint was processed
            let mut pending: Vec<(usize, i64)> = Vec::new(); // hints in flight, in commit order
            let mut reads: Vec<(usize, Option<Ticket>, i64)> = Vec::new(); // reads in flight
            for _ in 0..2_000 {
                let u = rng.index(users.len());
                match rng.below(6) {
                    0 => {
                        clock[u] += 1 + rng.below(3) as i64;
                        pending.push((u, clock[u]));
                    }
                    1 if !pending.is_empty() => {
                        let (v, stamp) = pending.remove(0);
                        known.observe(&users[v], stamp);
                        processed[v] = processed[v].max(stamp);
                    }
                    2 => reads.push((u, known.ticket(&users[u]), clock[u])),
                    3 if !reads.is_empty() => {
                        let (v, ticket, at) = reads.remove(rng.index(reads.len()));
                        known.learn(&users[v], ticket, at);
                    }
                    4 if rng.below(50) == 0 => {
                        // Hints are lost while the listener is down; their commits must not be hidden
                        // either, so they count as processed.
                        known.listener_down();
                        for (v, stamp) in pending.drain(..) {
                            processed[v] = processed[v].max(stamp);
                        }
                        known.listener_up();
                    }
                    _ => {
                        let since = rng.below(clock[u] as u64 + 2) as i64;
                        if known.nothing_after(&users[u], since) {
                            assert!(
                                since <= clock[u],
                                "answered for a cursor ahead of the clock"
                            );
                            assert!(
                                processed[u] <= since,
                                "hid a processed commit at {} behind {since}",
                                processed[u]
                            );
                        }
                    }
                }
            }
        }
    }
}
