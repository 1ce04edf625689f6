//! Replay protection: an EIP-3009 authorization `(chain, asset, from, nonce)` is reserved atomically before
//! its request goes upstream, and stays reserved until the authorization expires.

pub use x402_proto::NonceKey;

use moka::sync::Cache;
use moka::Expiry;
use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    #[error("this authorization has already been used")]
    Replayed,
    #[error("too many payments in flight; retry shortly")]
    Full,
}

/// Replay protection's state: the authorizations reserved (spent, or being spent, until they expire) and
/// those whose request is being served right now. One process's memory today ([`MemoryGuard`]); a store
/// that replicas share next.
pub trait ReplayGuard: Send + Sync {
    /// Reserves `key` until `valid_before` (unix seconds) if nobody holds it; of concurrent callers with one
    /// key exactly one succeeds.
    fn reserve(&self, key: NonceKey, valid_before: u64) -> Result<(), ReserveError>;
    fn contains(&self, key: &NonceKey) -> bool;
    fn release(&self, key: &NonceKey);
    /// Reservations live now.
    fn reserved(&self) -> u64;
    /// Marks `key` as being served; false when another request already serves it.
    fn start_serving(&self, key: NonceKey) -> bool;
    fn end_serving(&self, key: &NonceKey);
}

/// Replay protection in this process's memory: a bounded `moka` cache of reservations and the set being served.
pub struct MemoryGuard {
    reservations: Reservations,
    serving: Mutex<HashSet<NonceKey>>,
}

impl MemoryGuard {
    pub fn new(capacity: u64) -> MemoryGuard {
        MemoryGuard { reservations: Reservations::new(capacity), serving: Mutex::default() }
    }
}

impl ReplayGuard for MemoryGuard {
    fn reserve(&self, key: NonceKey, valid_before: u64) -> Result<(), ReserveError> {
        self.reservations.reserve(key, valid_before)
    }

    fn contains(&self, key: &NonceKey) -> bool {
        self.reservations.contains(key)
    }

    fn release(&self, key: &NonceKey) {
        self.reservations.release(key);
    }

    fn reserved(&self) -> u64 {
        self.reservations.count()
    }

    fn start_serving(&self, key: NonceKey) -> bool {
        self.serving.lock().unwrap_or_else(PoisonError::into_inner).insert(key)
    }

    fn end_serving(&self, key: &NonceKey) {
        self.serving.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
    }
}

pub struct Reservations {
    /// Value: the authorization's `validBefore`, in unix seconds.
    cache: Cache<NonceKey, u64>,
    capacity: u64,
}

/// Entries live until their authorization's `validBefore`: after that it can never be settled again.
struct UntilValidBefore;

impl Expiry<NonceKey, u64> for UntilValidBefore {
    fn expire_after_create(&self, _key: &NonceKey, valid_before: &u64, _created_at: Instant) -> Option<Duration> {
        Some(Duration::from_secs(valid_before.saturating_sub(unix_now()).saturating_add(1)))
    }
}

impl Reservations {
    /// Holds at most `capacity` live reservations. The cache itself is sized with headroom so that moka
    /// never evicts a live reservation (that would reopen a replay); new ones are refused first.
    pub fn new(capacity: u64) -> Reservations {
        let cache = Cache::builder().max_capacity(capacity.saturating_mul(2)).expire_after(UntilValidBefore).build();
        Reservations { cache, capacity }
    }

    /// Reserves `key` if nobody holds it; of concurrent callers with one key exactly one succeeds.
    pub fn reserve(&self, key: NonceKey, valid_before: u64) -> Result<(), ReserveError> {
        if self.cache.entry_count() >= self.capacity {
            self.cache.run_pending_tasks();
            if self.cache.entry_count() >= self.capacity {
                return Err(ReserveError::Full);
            }
        }
        let entry = self.cache.entry(key).or_insert_with(|| valid_before);
        if entry.is_fresh() {
            Ok(())
        } else {
            Err(ReserveError::Replayed)
        }
    }

    pub fn contains(&self, key: &NonceKey) -> bool {
        self.cache.contains_key(key)
    }

    pub fn release(&self, key: &NonceKey) {
        self.cache.invalidate(key);
    }

    /// Live reservations now (expired ones leave on moka's housekeeping, which this runs first).
    pub fn count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

pub use x402_proto::unix_now;

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{Address, B256};

    fn key(n: u8) -> NonceKey {
        NonceKey { chain_id: 1, asset: Address::ZERO, from: Address::ZERO, nonce: B256::repeat_byte(n) }
    }

    #[test]
    fn second_reservation_is_a_replay() {
        let reservations = Reservations::new(10);
        let later = unix_now() + 60;
        assert_eq!(reservations.reserve(key(1), later), Ok(()));
        assert_eq!(reservations.reserve(key(1), later), Err(ReserveError::Replayed));
        assert_eq!(reservations.reserve(key(2), later), Ok(()));
        reservations.release(&key(1));
        assert_eq!(reservations.reserve(key(1), later), Ok(()), "a released authorization may be used again");
    }

    #[test]
    fn capacity_is_enforced() {
        let reservations = Reservations::new(3);
        let later = unix_now() + 60;
        for n in 0..3 {
            reservations.reserve(key(n), later).unwrap();
        }
        reservations.cache.run_pending_tasks();
        assert_eq!(reservations.reserve(key(9), later), Err(ReserveError::Full));
    }

    #[test]
    fn concurrent_reservations_admit_exactly_one() {
        let reservations = std::sync::Arc::new(Reservations::new(1000));
        let later = unix_now() + 60;
        let winners: usize = (0..16)
            .map(|_| {
                let r = reservations.clone();
                std::thread::spawn(move || usize::from(r.reserve(key(7), later).is_ok()))
            })
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(winners, 1);
    }
}
