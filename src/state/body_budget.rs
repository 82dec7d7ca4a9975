//! Large request bodies in flight (issue 11 §4).
//!
//! A push holds memory many times its body's size until it is answered (the parsed changes, the merged
//! record states, the statement's parameters; BENCHMARKS.md has the figures), so the bytes of the large
//! bodies being read or worked on at once are bounded: `MAX_INFLIGHT_BODY_BYTES` for the whole server, and
//! for one user the larger of one maximal body and a quarter of that. A body is counted from before it is
//! read (its declared length, or as it arrives when chunked) until its response is built.
//!
//! Bodies of at most [`SMALL_BODY`] bytes are not counted: they are the web client's everyday pushes, the
//! hot path, and they stay bounded by the request slots. So a server whose budget is full still takes them.
//!
//! Nothing waits for budget: a body over the user's share gets 429, one over the server's budget 503, both
//! with `Retry-After` (the web client retries both).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// Bodies up to this size are not counted.
pub const SMALL_BODY: usize = 64 * 1024;

pub struct BodyBudget {
    total: usize,
    per_user: usize,
    state: Mutex<State>,
    refused_user: AtomicU64,
    refused_server: AtomicU64,
}

#[derive(Default)]
struct State {
    used: usize,
    users: HashMap<String, usize>,
}

/// Whose bound a body would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The user's share.
    User,
    /// The server's budget.
    Server,
}

/// Bytes a request holds of the budget, given back when it is dropped.
pub struct Reservation {
    budget: Arc<BodyBudget>,
    user: String,
    bytes: usize,
}

impl BodyBudget {
    /// `total` bytes for the server; a user gets the larger of `max_body` and a quarter of `total` (never
    /// more than `total`).
    pub fn new(total: usize, max_body: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            total,
            per_user: max_body.max(total / 4).min(total),
            state: Mutex::new(State::default()),
            refused_user: AtomicU64::new(0),
            refused_server: AtomicU64::new(0),
        })
    }

    /// An empty reservation for `user`; it grows as the body turns out to be large.
    pub fn reservation(self: &Arc<Self>, user: &str) -> Reservation {
        Reservation {
            budget: self.clone(),
            user: user.to_owned(),
            bytes: 0,
        }
    }

    pub fn per_user(&self) -> usize {
        self.per_user
    }

    /// Bytes counted now.
    pub fn used(&self) -> usize {
        self.state.lock().used
    }

    /// Bodies refused so far: (over a user's share, over the server's budget).
    pub fn refusals(&self) -> (u64, u64) {
        (
            self.refused_user.load(Ordering::Relaxed),
            self.refused_server.load(Ordering::Relaxed),
        )
    }

    fn take(&self, user: &str, bytes: usize) -> Result<(), Refused> {
        let mut state = self.state.lock();
        let mine = state.users.get(user).copied().unwrap_or(0);
        if mine + bytes > self.per_user {
            self.refused_user.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::User);
        }
        if state.used + bytes > self.total {
            self.refused_server.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Server);
        }
        state.used += bytes;
        *state.users.entry(user.to_owned()).or_insert(0) += bytes;
        Ok(())
    }

    fn give_back(&self, user: &str, bytes: usize) {
        let mut state = self.state.lock();
        state.used -= bytes;
        if let Some(mine) = state.users.get_mut(user) {
            *mine -= bytes;
            if *mine == 0 {
                state.users.remove(user);
            }
        }
    }
}

impl Reservation {
    /// Makes the reservation cover a body of `size` bytes so far. Free up to [`SMALL_BODY`]; past it the
    /// whole size counts.
    pub fn cover(&mut self, size: usize) -> Result<(), Refused> {
        if size <= SMALL_BODY || size <= self.bytes {
            return Ok(());
        }
        self.budget.take(&self.user, size - self.bytes)?;
        self.bytes = size;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give_back(&self.user, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn large_bodies_are_bounded_per_user_and_in_all_small_ones_never() {
        let budget = BodyBudget::new(40 * MIB, 10 * MIB);
        assert_eq!(budget.per_user(), 10 * MIB);
        let mut a = budget.reservation("a");
        a.cover(9 * MIB).unwrap();
        a.cover(10 * MIB).unwrap(); // grows by the difference
        let mut a2 = budget.reservation("a");
        assert_eq!(a2.cover(MIB), Err(Refused::User), "over a's share");
        a2.cover(SMALL_BODY).unwrap();
        let mut others: Vec<Reservation> = ["b", "c", "d"]
            .iter()
            .map(|user| {
                let mut r = budget.reservation(user);
                r.cover(10 * MIB).unwrap();
                r
            })
            .collect();
        assert_eq!(budget.used(), 40 * MIB);
        let mut e = budget.reservation("e");
        assert_eq!(e.cover(SMALL_BODY + 1), Err(Refused::Server), "budget full");
        e.cover(SMALL_BODY).unwrap();
        assert_eq!(budget.refusals(), (1, 1));
        others.pop();
        e.cover(5 * MIB).unwrap();
        drop(a);
        drop(others);
        drop(e);
        assert_eq!(budget.used(), 0);
        assert!(budget.state.lock().users.is_empty());
    }

    #[test]
    fn a_users_share_is_never_above_the_budget() {
        let budget = BodyBudget::new(MIB, 10 * MIB);
        assert_eq!(budget.per_user(), MIB);
        let budget = BodyBudget::new(100 * MIB, MIB);
        assert_eq!(budget.per_user(), 25 * MIB);
    }
}
