//! A route's remote facilitators. Each facilitator has a limit on the calls in flight to it that adapts to
//! what it sustains, and a health learned from `GET /supported` and from its answers. A call goes to a
//! weighted choice among the healthy ones (one with room first), then to the others in order:
//! - `/verify` moves on whenever a facilitator gives no verdict;
//! - `/settle` is sent again (after a backoff, to the next facilitator when there are several) only when the
//!   attempt certainly broadcast nothing and may pass another time (busy, unreachable, its signer's nonce
//!   race), for a bounded number of attempts while the authorization has time left. A failure after a
//!   broadcast may have moved the money: it is never sent again, and the ledger reconciles it.
//!
//! An `exact` authorization (EIP-3009) names no settler: any facilitator can settle it, and the chain lets it
//! move once. A scheme whose authorization names its settler (`upto`'s Permit2 witness names the facilitator's
//! address) must stay on that facilitator: [`super::Facilitators::pinned`] gives one facilitator alone, with
//! its limit, health and retries but no failover.

use super::limiter::{AdaptiveLimit, Load, Permit};
use super::remote::{RemoteFacilitator, SettleAttempt, Signal};
use super::{remote_body, BeforeBroadcast, Facilitator, Pending, SettleFailure, Settled, VerifyFailure};
use crate::options::{RemoteConfig, SettlementOptions};
use alloy::primitives::{Address, B256, U256};
use http::HeaderValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use x402_proto::wire::ResourceInfo;
use x402_proto::{Authorization, Payment};

/// Where a facilitator's limits start; they double from there while calls succeed.
const START_LIMIT: usize = 1;
/// Calls in a row without a usable answer before a facilitator is passed over for [`COOL_DOWN`].
const FAILURES_TO_COOL_DOWN: u32 = 3;
const COOL_DOWN: Duration = Duration::from_secs(10);
/// How often every facilitator is asked `GET /supported`, besides at start and by `/readyz`.
const PROBE_INTERVAL: Duration = Duration::from_secs(15);
/// `/settle` calls for one payment, the first included.
const SETTLE_ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// No retry starts with less validity left: the reference facilitator refuses an authorization with under
/// 6 s to go, and the transaction needs time to land.
const VALIDITY_MARGIN: Duration = Duration::from_secs(10);
/// The refusal of an authorization that is already used: after an earlier attempt, that attempt may be what
/// used it.
const ALREADY_USED: &str = "invalid_exact_evm_nonce_already_used";

/// One remote facilitator, shared by every route that names it (with the same `auth`): its limits and health
/// are its own.
pub struct Member {
    url: String,
    auth: Option<HeaderValue>,
    client: RemoteFacilitator,
    verify_limit: AdaptiveLimit,
    settle_limit: AdaptiveLimit,
    max_concurrency: usize,
    /// Longest a call waits for its turn (the call's own timeout).
    max_wait: Duration,
    health: Mutex<Health>,
    /// `/settle` calls sent again after a failure here that broadcast nothing.
    retries: AtomicU64,
    /// Calls that went on to another facilitator after this one failed them.
    failovers: AtomicU64,
}

/// A facilitator's state, as `/readyz` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FacilitatorState {
    /// Its URL, redacted (with `#2`, `#3` after a name already shown).
    pub name: String,
    pub healthy: bool,
    pub verify_limit: usize,
    pub settle_limit: usize,
    pub verify_in_flight: usize,
    pub settle_in_flight: usize,
    pub retries: u64,
    pub failovers: u64,
}

#[derive(Default)]
struct Health {
    failures_in_a_row: u32,
    cooling_until: Option<Instant>,
}

impl Health {
    fn healthy(&self, now: Instant) -> bool {
        self.cooling_until.is_none_or(|until| now >= until)
    }

    fn after(&mut self, signal: Signal, now: Instant) {
        match signal {
            Signal::Down => {
                self.failures_in_a_row += 1;
                if self.failures_in_a_row >= FAILURES_TO_COOL_DOWN {
                    self.cool_down(now);
                }
            }
            Signal::Answered | Signal::Busy | Signal::Raced => *self = Health::default(),
        }
    }

    fn cool_down(&mut self, now: Instant) {
        self.cooling_until = Some(now + COOL_DOWN);
        // Back from the cool-down on trial: one more failure sends it back.
        self.failures_in_a_row = FAILURES_TO_COOL_DOWN - 1;
    }
}

impl Member {
    pub fn new(config: &RemoteConfig, settings: &SettlementOptions) -> Member {
        let max = settings.facilitator_max_concurrency;
        Member {
            url: config.url.clone(),
            auth: config.auth.clone(),
            client: RemoteFacilitator::new(config.url.clone(), config.auth.clone(), settings.facilitator_timeout),
            verify_limit: AdaptiveLimit::new(START_LIMIT, max),
            settle_limit: AdaptiveLimit::new(START_LIMIT, max),
            max_concurrency: max,
            max_wait: settings.facilitator_timeout,
            health: Mutex::new(Health::default()),
            retries: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
        }
    }

    /// Whether it is the facilitator `config` names, under the same settings: a reload keeps it, with what its
    /// limits have learned.
    pub fn serves(&self, config: &RemoteConfig, settings: &SettlementOptions) -> bool {
        self.url == config.url
            && self.auth == config.auth
            && self.max_wait == settings.facilitator_timeout
            && self.max_concurrency == settings.facilitator_max_concurrency
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn client(&self) -> &RemoteFacilitator {
        &self.client
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        // Two fields, consistent after every statement: a panic elsewhere leaves them usable.
        self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn healthy(&self, now: Instant) -> bool {
        self.health().healthy(now)
    }

    /// Asks `GET /supported`: an answer makes it healthy, none cools it down.
    pub async fn probe(&self) -> Result<(), String> {
        let answer = match tokio::time::timeout(super::local::PROBE_TIMEOUT, self.client.supported()).await {
            Err(_) => Err("did not answer in time".to_string()),
            Ok(answer) => answer.map(|_| ()),
        };
        let mut health = self.health();
        match answer {
            Ok(()) => *health = Health::default(),
            Err(_) => health.cool_down(Instant::now()),
        }
        answer
    }

    async fn verify(&self, body: &serde_json::Value, until: Instant) -> Result<(), VerifyFailure> {
        let Some(permit) = self.verify_limit.acquire(until).await else {
            return Err(VerifyFailure::Unavailable("facilitator: too busy to take the call in time".into()));
        };
        let (verdict, signal) = self.client.verify(body).await;
        self.learn(permit, signal);
        verdict
    }

    async fn settle(&self, body: &serde_json::Value, until: Instant) -> SettleAttempt {
        let Some(permit) = self.settle_limit.acquire(until).await else {
            let why = "facilitator: too busy to take the call in time".to_string();
            let failure = SettleFailure::nothing_moved("unexpected_settle_error", why, None);
            return SettleAttempt { outcome: Err(failure), signal: Signal::Busy, transient: true };
        };
        let attempt = self.client.settle(body).await;
        self.learn(permit, attempt.signal);
        attempt
    }

    fn learn(&self, permit: Permit<'_>, signal: Signal) {
        permit.finished(match signal {
            Signal::Answered => Load::Coped,
            Signal::Busy | Signal::Down => Load::Overloaded,
            Signal::Raced => Load::Raced,
        });
        self.health().after(signal, Instant::now());
    }

    pub fn state(&self, name: String) -> FacilitatorState {
        FacilitatorState {
            name,
            healthy: self.healthy(Instant::now()),
            verify_limit: self.verify_limit.current(),
            settle_limit: self.settle_limit.current(),
            verify_in_flight: self.verify_limit.in_flight(),
            settle_in_flight: self.settle_limit.in_flight(),
            retries: self.retries.load(Ordering::Relaxed),
            failovers: self.failovers.load(Ordering::Relaxed),
        }
    }
}

/// The facilitators of one route (or one facilitator alone), as one [`Facilitator`].
pub struct RemoteGroup {
    /// Each with its weight, in the file's order.
    members: Vec<(Arc<Member>, u32)>,
    /// How the ledger names it: the facilitators' redacted URLs.
    name: String,
    /// Turns of the weighted choice.
    turn: AtomicU64,
}

impl RemoteGroup {
    pub fn new(members: Vec<(Arc<Member>, u32)>) -> RemoteGroup {
        let names: Vec<&str> = members.iter().map(|(member, _)| member.client.shown_url()).collect();
        RemoteGroup { name: names.join(", "), members, turn: AtomicU64::new(0) }
    }

    pub fn members(&self) -> impl Iterator<Item = &Arc<Member>> {
        self.members.iter().map(|(member, _)| member)
    }

    /// The facilitators to try, in order: a weighted choice among the healthy ones (among those with room, if
    /// any has), the other healthy ones, then the others; all in the file's order but the first.
    fn order(&self, has_room: impl Fn(&Member) -> bool) -> Vec<&Member> {
        let now = Instant::now();
        let has_room = &has_room;
        let healthy: Vec<bool> = self.members.iter().map(|(member, _)| member.healthy(now)).collect();
        let candidates = |roomy: bool| {
            self.members
                .iter()
                .zip(&healthy)
                .filter(move |((member, _), healthy)| **healthy && (!roomy || has_room(member)))
                .map(|((member, weight), _)| (&**member, u64::from(*weight)))
        };
        let roomy = candidates(true).next().is_some();
        let total: u64 = candidates(roomy).map(|(_, weight)| weight).sum();
        let mut first = None;
        if total > 0 {
            let mut ticket = self.turn.fetch_add(1, Ordering::Relaxed) % total;
            first = candidates(roomy).find(|(_, weight)| match ticket.checked_sub(*weight) {
                Some(rest) => {
                    ticket = rest;
                    false
                }
                None => true,
            });
        }
        let first = first.map(|(member, _)| member);
        let mut order: Vec<&Member> = first.into_iter().collect();
        order.extend(
            candidates(false).map(|(member, _)| member).filter(|m| !first.is_some_and(|f| std::ptr::eq(*m, f))),
        );
        order.extend(self.members.iter().zip(&healthy).filter(|(_, healthy)| !**healthy).map(|((m, _), _)| &**m));
        order
    }

    /// The facilitators a payment may go to, in order. An `upto` authorization names the one facilitator that
    /// may settle it: that one alone, with no failover.
    fn order_for(&self, payment: &Payment, has_room: impl Fn(&Member) -> bool) -> Vec<&Member> {
        let mut order = self.order(has_room);
        if let Authorization::Upto(auth) = &payment.authorization {
            let chain_id = payment.offer.network.chain_id;
            order.retain(|member| member.client.upto_signer(chain_id) == Some(auth.facilitator));
            order.truncate(1);
        }
        order
    }

    async fn verify_anywhere(&self, payment: &Payment, resource: &ResourceInfo) -> Result<(), VerifyFailure> {
        let body = remote_body(payment, &payment.offer, resource);
        let deadline = deadline(payment);
        let order = self.order_for(payment, |member| member.verify_limit.has_room());
        let mut last = VerifyFailure::Unavailable("facilitator: none is configured".into());
        for (i, member) in order.iter().enumerate() {
            match member.verify(&body, deadline.min(Instant::now() + member.max_wait)).await {
                Err(VerifyFailure::Unavailable(why)) => {
                    if i + 1 < order.len() {
                        member.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                    last = VerifyFailure::Unavailable(why);
                }
                verdict => return verdict,
            }
        }
        Err(last)
    }

    /// Settles `amount` (the requirements carry it: `upto` settles below the ceiling the buyer signed).
    async fn settle_with_retries(
        &self,
        payment: &Payment,
        resource: &ResourceInfo,
        amount: U256,
    ) -> Result<Settled, SettleFailure> {
        let mut offer = payment.offer.clone();
        offer.amount = amount;
        let body = remote_body(payment, &offer, resource);
        let deadline = deadline(payment);
        let Some(mut member) = self.order_for(payment, |member| member.settle_limit.has_room()).first().copied() else {
            let why = "facilitator: none is configured".to_string();
            return Err(SettleFailure::nothing_moved("unexpected_settle_error", why, None));
        };
        let mut attempts = 0;
        loop {
            let attempt = member.settle(&body, deadline.min(Instant::now() + member.max_wait)).await;
            attempts += 1;
            let mut failure = match attempt.outcome {
                Ok(settled) => return Ok(settled),
                Err(failure) => failure,
            };
            if attempts > 1 && failure.reason == ALREADY_USED {
                // Only the chain can tell whether an earlier attempt is what used it: reconciliation will.
                failure.nothing_moved = false;
                failure.message = format!("{} (after an earlier attempt that may have settled it)", failure.message);
                return Err(failure);
            }
            let pause = backoff(attempts, &payment.authorization.nonce());
            let retry = failure.nothing_moved
                && attempt.transient
                && attempts < SETTLE_ATTEMPTS
                && Instant::now() + pause < deadline;
            if !retry {
                return Err(failure);
            }
            member.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
            // The next choice, now: another healthy facilitator than the one that just failed if there is one,
            // else the first choice (which may be that one again).
            let order = self.order_for(payment, |candidate| candidate.settle_limit.has_room());
            let now = Instant::now();
            let other = order.iter().find(|c| !std::ptr::eq(**c, member) && c.healthy(now));
            let next = other.or(order.first()).copied().unwrap_or(member);
            if !std::ptr::eq(next, member) {
                member.failovers.fetch_add(1, Ordering::Relaxed);
            }
            member = next;
        }
    }
}

impl Facilitator for RemoteGroup {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn verify<'a>(
        &'a self,
        payment: &'a Payment,
        resource: &'a ResourceInfo,
    ) -> Pending<'a, Result<(), VerifyFailure>> {
        Box::pin(self.verify_anywhere(payment, resource))
    }

    /// A remote facilitator broadcasts itself: there is no hash to record before.
    fn settle<'a>(
        &'a self,
        payment: &'a Payment,
        resource: &'a ResourceInfo,
        amount: U256,
        _: Option<BeforeBroadcast>,
    ) -> Pending<'a, Result<Settled, SettleFailure>> {
        Box::pin(self.settle_with_retries(payment, resource, amount))
    }

    /// The signer of the first facilitator, healthy ones first, that has announced one for `chain_id`: the
    /// one its `upto` offers name, and so the one that settles them.
    fn upto_signer(&self, chain_id: u64) -> Option<Address> {
        let now = Instant::now();
        let (healthy, others): (Vec<&Arc<Member>>, Vec<&Arc<Member>>) = self.members().partition(|m| m.healthy(now));
        healthy.into_iter().chain(others).find_map(|member| member.client.upto_signer(chain_id))
    }

    fn learn_upto_signers(&self) -> Pending<'_, ()> {
        Box::pin(async move {
            for member in self.members() {
                member.client.learn_upto_signers().await;
            }
        })
    }
}

/// Until when a payment may still be sent to settle: its authorization's expiry, less [`VALIDITY_MARGIN`].
fn deadline(payment: &Payment) -> Instant {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let left = Duration::from_secs(payment.authorization.expires_at()).saturating_sub(now);
    // The gate refuses authorizations valid for longer than the offer allows; a day bounds the arithmetic.
    Instant::now() + left.saturating_sub(VALIDITY_MARGIN).min(Duration::from_secs(86_400))
}

/// Doubling from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`], stretched by up to as much again by the authorization's
/// random nonce, so that payments that failed together are not sent together again.
fn backoff(attempts: u32, nonce: &B256) -> Duration {
    let base = FIRST_BACKOFF.saturating_mul(1 << attempts.saturating_sub(1).min(16)).min(MAX_BACKOFF);
    let stretch = f64::from(nonce[attempts as usize % nonce.len()]) / 255.0;
    base + base.mul_f64(stretch)
}

/// Asks every facilitator `GET /supported` at once and then every [`PROBE_INTERVAL`], until dropped.
pub struct Probes(tokio::task::JoinHandle<()>);

impl Probes {
    pub fn spawn(members: Vec<Weak<Member>>) -> Probes {
        Probes(tokio::spawn(async move {
            loop {
                for member in members.iter().filter_map(Weak::upgrade) {
                    // The outcome is its health; readiness reports it.
                    let _ = member.probe().await;
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        }))
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_row_cool_a_facilitator_down_and_an_answer_brings_it_back() {
        let now = Instant::now();
        let mut health = Health::default();
        health.after(Signal::Down, now);
        health.after(Signal::Down, now);
        assert!(health.healthy(now), "two failures");
        health.after(Signal::Busy, now);
        health.after(Signal::Down, now);
        health.after(Signal::Down, now);
        assert!(health.healthy(now), "a busy answer is an answer: the count starts again");
        health.after(Signal::Down, now);
        assert!(!health.healthy(now), "three in a row");
        assert!(health.healthy(now + COOL_DOWN), "tried again after the cool-down");
        health.after(Signal::Down, now + COOL_DOWN);
        assert!(!health.healthy(now + COOL_DOWN), "one more failure on trial sends it back");
        health.after(Signal::Answered, now + COOL_DOWN);
        assert!(health.healthy(now + COOL_DOWN));
    }

    #[test]
    fn backoff_doubles_within_its_bounds() {
        let calm = B256::ZERO;
        assert_eq!(backoff(1, &calm), FIRST_BACKOFF);
        assert_eq!(backoff(2, &calm), FIRST_BACKOFF * 2);
        assert_eq!(backoff(40, &calm), MAX_BACKOFF);
        let stretched = B256::repeat_byte(0xff);
        assert_eq!(backoff(1, &stretched), FIRST_BACKOFF * 2);
        assert_eq!(backoff(40, &stretched), MAX_BACKOFF * 2);
    }
}
