//! A limit on the calls in flight to one remote facilitator that adapts to what it sustains: additive
//! increase while calls succeed, multiplicative decrease when they fail for load (busy, nonce races, timeouts,
//! 5xx). Calls over the limit wait their turn, first come first served, for a bounded time.

use std::sync::Mutex;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// The limit never goes under one call: a facilitator that fails at one call at a time is down, not busy.
const MIN_LIMIT: f64 = 1.0;
/// What the limit is multiplied by on a failure for load.
const DECREASE: f64 = 0.5;

pub struct AdaptiveLimit {
    /// Its permits are the calls the limit allows now, less those a decrease still owes.
    slots: Semaphore,
    state: Mutex<State>,
    max: f64,
}

struct State {
    /// The limit, fractional so that increases add up (one call per limit's worth of successes).
    limit: f64,
    /// The whole calls `limit` allows, as given to `slots`.
    granted: usize,
    /// Permits that a decrease took back while they were out: forgotten when they come back.
    owed: usize,
    in_flight: usize,
    /// Counts decreases: a failure of a call sent before the last decrease does not decrease again.
    epoch: u64,
}

/// How a call went, as the limit learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// It was answered: the limit may grow.
    Coped,
    /// It failed for load: the limit shrinks.
    Overloaded,
    /// It says nothing about load (the call was abandoned).
    Unknown,
}

/// One call in flight; returns its slot when dropped.
pub struct Permit<'a> {
    limit: &'a AdaptiveLimit,
    slot: Option<SemaphorePermit<'a>>,
    epoch: u64,
    load: Load,
}

impl AdaptiveLimit {
    /// Starts at `initial` calls in flight (clamped to `1..=max`) and never grows past `max`.
    pub fn new(initial: usize, max: usize) -> AdaptiveLimit {
        let max = max.max(1);
        let initial = initial.clamp(1, max);
        AdaptiveLimit {
            slots: Semaphore::new(initial),
            state: Mutex::new(State { limit: initial as f64, granted: initial, owed: 0, in_flight: 0, epoch: 0 }),
            max: max as f64,
        }
    }

    /// A slot, once one is free and every caller before this one has had its own; `None` at `until`.
    pub async fn acquire(&self, until: Instant) -> Option<Permit<'_>> {
        let slot = tokio::time::timeout_at(until, self.slots.acquire()).await.ok()?.ok()?;
        let mut state = self.lock();
        state.in_flight += 1;
        Some(Permit { limit: self, slot: Some(slot), epoch: state.epoch, load: Load::Unknown })
    }

    /// Whether a call would get a slot without waiting.
    pub fn has_room(&self) -> bool {
        self.slots.available_permits() > 0
    }

    /// The calls allowed in flight now.
    pub fn current(&self) -> usize {
        self.lock().granted
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a few numbers, consistent after every statement: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn finish(&self, slot: SemaphorePermit<'_>, epoch: u64, load: Load) {
        let mut state = self.lock();
        state.in_flight -= 1;
        match load {
            Load::Coped => state.limit = (state.limit + 1.0 / state.limit).min(self.max),
            // Calls sent under the limit that has already been cut were sent too many at once, together:
            // they cut it once, as TCP does once per window.
            Load::Overloaded if epoch == state.epoch => {
                state.limit = (state.limit * DECREASE).max(MIN_LIMIT);
                state.epoch += 1;
            }
            Load::Overloaded | Load::Unknown => {}
        }
        if state.owed > 0 {
            state.owed -= 1;
            slot.forget();
        } else {
            drop(slot);
        }
        let target = state.limit.floor() as usize;
        if target > state.granted {
            let mut more = target - state.granted;
            let repaid = more.min(state.owed);
            state.owed -= repaid;
            more -= repaid;
            self.slots.add_permits(more);
        } else if target < state.granted {
            let fewer = state.granted - target;
            let taken = self.slots.forget_permits(fewer);
            state.owed += fewer - taken;
        }
        state.granted = target;
    }
}

impl Permit<'_> {
    /// Records how the call went; without it, the call says nothing about load.
    pub fn finished(mut self, load: Load) {
        self.load = load;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.limit.finish(slot, self.epoch, self.load);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    async fn call(limit: &AdaptiveLimit, load: Load) {
        limit.acquire(soon()).await.expect("a slot").finished(load);
    }

    #[tokio::test]
    async fn successes_add_one_call_per_limits_worth_and_stop_at_the_maximum() {
        let limit = AdaptiveLimit::new(2, 4);
        call(&limit, Load::Coped).await;
        call(&limit, Load::Coped).await;
        assert_eq!(limit.current(), 2, "2 + 1/2 + 1/2.5 allows two calls");
        call(&limit, Load::Coped).await;
        assert_eq!(limit.current(), 3);
        for _ in 0..100 {
            call(&limit, Load::Coped).await;
        }
        assert_eq!(limit.current(), 4, "never past the maximum");
        assert_eq!(limit.in_flight(), 0);
    }

    #[tokio::test]
    async fn failures_for_load_halve_it_down_to_one_call() {
        let limit = AdaptiveLimit::new(16, 16);
        call(&limit, Load::Overloaded).await;
        assert_eq!(limit.current(), 8);
        for _ in 0..10 {
            call(&limit, Load::Overloaded).await;
        }
        assert_eq!(limit.current(), 1, "never under one call");
        call(&limit, Load::Unknown).await;
        assert_eq!(limit.current(), 1);
        call(&limit, Load::Coped).await;
        assert_eq!(limit.current(), 2);
    }

    #[tokio::test]
    async fn calls_sent_together_cut_the_limit_once() {
        let limit = AdaptiveLimit::new(8, 8);
        let permits: Vec<_> = acquire_all(&limit, 8).await;
        for permit in permits {
            permit.finished(Load::Overloaded);
        }
        assert_eq!(limit.current(), 4, "eight failures of one window: one decrease");
    }

    async fn acquire_all(limit: &AdaptiveLimit, n: usize) -> Vec<Permit<'_>> {
        let mut permits = Vec::new();
        for _ in 0..n {
            permits.push(limit.acquire(soon()).await.expect("a slot"));
        }
        permits
    }

    #[tokio::test]
    async fn a_call_over_the_limit_waits_for_a_slot_and_gives_up_at_its_deadline() {
        let limit = AdaptiveLimit::new(1, 4);
        let first = limit.acquire(soon()).await.expect("a slot");
        assert!(!limit.has_room());
        let deadline = Instant::now() + Duration::from_millis(50);
        assert!(limit.acquire(deadline).await.is_none(), "no slot before the deadline");
        let waiting = limit.acquire(soon());
        drop(first);
        assert!(waiting.await.is_some(), "the freed slot goes to the waiting call");
    }

    #[tokio::test]
    async fn a_decrease_while_calls_are_out_holds_new_calls_back_until_they_return() {
        let limit = AdaptiveLimit::new(4, 4);
        let mut out = acquire_all(&limit, 4).await;
        out.pop().expect("a permit").finished(Load::Overloaded);
        assert_eq!(limit.current(), 2);
        assert_eq!(limit.in_flight(), 3);
        let blocked = Instant::now() + Duration::from_millis(50);
        assert!(limit.acquire(blocked).await.is_none(), "three out, two allowed");
        out.pop();
        assert!(limit.acquire(blocked + Duration::from_millis(50)).await.is_none(), "two out, two allowed");
        out.pop();
        let permit = limit.acquire(soon()).await;
        assert!(permit.is_some(), "one out: room for a second");
        assert_eq!(limit.in_flight(), 2);
    }
}
