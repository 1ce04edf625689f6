//! A limit on the calls in flight to one remote facilitator that adapts to what it sustains, as TCP's
//! congestion window does. From one call, it doubles while calls that use it succeed (slow start), until the
//! first failure for load (busy, timeouts, 5xx); then it grows by one call per limit's worth of successes
//! and halves on each such failure. A facilitator whose signer races its own nonces at some number of
//! concurrent settlements is held under that number from then on: a race is not load that passes, and each
//! climb back to that number would cost settlements a retry each. Calls over the limit wait their turn,
//! first come first served, for a bounded time.

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
}

struct State {
    /// The limit, fractional so that increases add up (one call per limit's worth of successes).
    limit: f64,
    /// What the limit may grow to: the maximum, or just under where the facilitator raced.
    ceiling: f64,
    /// Until the first failure, each success adds a call.
    slow_start: bool,
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
    /// The facilitator's signer raced its own nonces: the limit shrinks and stays under where it was.
    Raced,
    /// It says nothing about load (the call was abandoned).
    Unknown,
}

/// One call in flight; returns its slot when dropped.
pub struct Permit<'a> {
    limit: &'a AdaptiveLimit,
    slot: Option<SemaphorePermit<'a>>,
    /// When it was sent: the decreases so far, the calls allowed and those in flight (itself included).
    sent: Sent,
    load: Load,
}

#[derive(Clone, Copy)]
struct Sent {
    epoch: u64,
    granted: usize,
    in_flight: usize,
}

impl AdaptiveLimit {
    /// Starts at `initial` calls in flight (clamped to `1..=max`) and never grows past `max`.
    pub fn new(initial: usize, max: usize) -> AdaptiveLimit {
        let max = max.max(1);
        let initial = initial.clamp(1, max);
        let state = State {
            limit: initial as f64,
            ceiling: max as f64,
            slow_start: true,
            granted: initial,
            owed: 0,
            in_flight: 0,
            epoch: 0,
        };
        AdaptiveLimit { slots: Semaphore::new(initial), state: Mutex::new(state) }
    }

    /// A slot, once one is free and every caller before this one has had its own; `None` at `until`.
    pub async fn acquire(&self, until: Instant) -> Option<Permit<'_>> {
        let slot = tokio::time::timeout_at(until, self.slots.acquire()).await.ok()?.ok()?;
        let mut state = self.lock();
        state.in_flight += 1;
        let sent = Sent { epoch: state.epoch, granted: state.granted, in_flight: state.in_flight };
        Some(Permit { limit: self, slot: Some(slot), sent, load: Load::Unknown })
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

    fn finish(&self, slot: SemaphorePermit<'_>, sent: Sent, load: Load) {
        let mut state = self.lock();
        state.in_flight -= 1;
        if load == Load::Raced {
            state.ceiling = state.ceiling.min((sent.granted as f64 - 1.0).max(MIN_LIMIT));
        }
        match load {
            // A limit grows only by calls that used it (half of it at least): one call at a time says nothing
            // about ten.
            Load::Coped if sent.in_flight * 2 < sent.granted => {}
            Load::Coped => {
                let step = if state.slow_start { 1.0 } else { 1.0 / state.limit };
                state.limit = (state.limit + step).min(state.ceiling);
            }
            // Calls sent under the limit that has already been cut were sent too many at once, together:
            // they cut it once, as TCP does once per window.
            Load::Overloaded | Load::Raced if sent.epoch == state.epoch => {
                state.limit = (state.limit * DECREASE).max(MIN_LIMIT);
                state.slow_start = false;
                state.epoch += 1;
            }
            Load::Overloaded | Load::Raced | Load::Unknown => {}
        }
        state.limit = state.limit.min(state.ceiling);
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
            self.limit.finish(slot, self.sent, self.load);
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

    /// A call sent while every other slot is taken: the limit is in use.
    async fn call_at_full_use(limit: &AdaptiveLimit, load: Load) {
        let others = acquire_all(limit, limit.current() - 1).await;
        call(limit, load).await;
        drop(others);
    }

    #[tokio::test]
    async fn successes_add_a_call_each_until_a_failure_then_one_per_limits_worth_up_to_the_maximum() {
        let limit = AdaptiveLimit::new(1, 40);
        for _ in 0..7 {
            call_at_full_use(&limit, Load::Coped).await;
        }
        assert_eq!(limit.current(), 8, "slow start: one more call per success");
        call_at_full_use(&limit, Load::Overloaded).await;
        assert_eq!(limit.current(), 4);
        for _ in 0..4 {
            call_at_full_use(&limit, Load::Coped).await;
        }
        assert_eq!(limit.current(), 4, "4 + 1/4 + ... stays under 5 for four successes");
        call_at_full_use(&limit, Load::Coped).await;
        assert_eq!(limit.current(), 5);
        for _ in 0..1000 {
            call_at_full_use(&limit, Load::Coped).await;
        }
        assert_eq!(limit.current(), 40, "never past the maximum");
        assert_eq!(limit.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_limit_grows_only_by_calls_that_use_it() {
        let limit = AdaptiveLimit::new(1, 32);
        for _ in 0..100 {
            call(&limit, Load::Coped).await;
        }
        assert_eq!(limit.current(), 3, "one call at a time proves three at most (half of the limit in use)");
    }

    #[tokio::test]
    async fn a_nonce_race_holds_the_limit_under_where_it_happened() {
        let limit = AdaptiveLimit::new(1, 32);
        call(&limit, Load::Coped).await;
        assert_eq!(limit.current(), 2);
        let racing = acquire_all(&limit, 2).await;
        for permit in racing {
            permit.finished(Load::Raced);
        }
        assert_eq!(limit.current(), 1);
        for _ in 0..100 {
            call_at_full_use(&limit, Load::Coped).await;
        }
        assert_eq!(limit.current(), 1, "it raced at two calls at once: never two again");
        call(&limit, Load::Overloaded).await;
        assert_eq!(limit.current(), 1);
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
        call_at_full_use(&limit, Load::Coped).await;
        assert_eq!(limit.current(), 2, "1 + 1/1");
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
