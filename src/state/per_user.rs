//! Requests in flight per user: one user holds at most `max` of the server's request slots (the rest of
//! its requests get 429 + `Retry-After` before their body is read), so a user sending slow bodies cannot
//! take the slots of everyone else.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use parking_lot::Mutex;

const SHARDS: usize = 16;

pub struct InFlight {
    shards: Box<[Mutex<HashMap<String, usize>>]>,
    max: usize,
    hasher: std::collections::hash_map::RandomState,
}

/// One request of a user in flight; counted until dropped.
pub struct Slot {
    owner: Arc<InFlight>,
    user: String,
}

impl InFlight {
    pub fn new(max: usize) -> Arc<InFlight> {
        Arc::new(InFlight {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max: max.max(1),
            hasher: Default::default(),
        })
    }

    fn shard(&self, user: &str) -> &Mutex<HashMap<String, usize>> {
        &self.shards[(self.hasher.hash_one(user) as usize) % SHARDS]
    }

    /// A slot for `user`, or `None` when it already has `max` requests in flight.
    pub fn enter(self: &Arc<Self>, user: &str) -> Option<Slot> {
        let mut shard = self.shard(user).lock();
        let count = shard.entry(user.to_owned()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Slot {
            owner: self.clone(),
            user: user.to_owned(),
        })
    }

    /// Users with requests in flight.
    pub fn users(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut shard = self.owner.shard(&self.user).lock();
        if let Some(count) = shard.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_at_most_max_slots_and_others_are_unaffected() {
        let in_flight = InFlight::new(2);
        let a1 = in_flight.enter("a").unwrap();
        let _a2 = in_flight.enter("a").unwrap();
        assert!(in_flight.enter("a").is_none());
        let _b = in_flight.enter("b").unwrap();
        drop(a1);
        let _a3 = in_flight.enter("a").expect("a slot was given back");
        assert_eq!(in_flight.users(), 2);
    }

    #[test]
    fn entries_go_away_when_the_last_request_ends() {
        let in_flight = InFlight::new(3);
        let slots: Vec<Slot> = (0..3).filter_map(|_| in_flight.enter("a")).collect();
        assert_eq!(slots.len(), 3);
        drop(slots);
        assert_eq!(in_flight.users(), 0);
    }
}
