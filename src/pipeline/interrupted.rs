//! Streams the gateway stopped in the middle of. An `upto` stream goes out before its payment settles, so a
//! gateway that stops mid-stream (a crash, a kill) would leave the seller unpaid for what went out. While it
//! streams, its row keeps what settles it (the buyer's payment as sent, the resource) and the price of what
//! has gone out so far, refreshed every [`PROGRESS_EVERY`]. Reconciliation settles such a row, left by a run
//! that is gone, for that amount: what was delivered, up to one refresh's worth less, never more.

use super::paid::record_hash_before;
use super::{Gateway, Live};
use crate::gate::Payment;
use crate::ledger::{LedgerError, Row, State};
use crate::pricing::Pricing;
use crate::replay::unix_now;
use crate::settlement::Settled;
use crate::x402::wire::ResourceInfo;
use crate::x402::Rejection;
use alloy::primitives::{Address, U256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use x402_proto::OfferScheme;

/// How often a stream's row learns the price of what has gone out.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A permit with no more time left than the settler's own margin is left to lapse: it would refuse to send.
const SETTLE_MIN_LEFT_SECS: u64 = x402_proto::exact_evm::SETTLE_MARGIN_SECS;
/// Settlements of one interrupted stream refused before any broadcast (the node just back, say) are tried
/// this many times, this far apart, before the row is given up as failed.
const SETTLE_ATTEMPTS: u32 = 3;
const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// What settles a stream once its request is gone: the buyer's payment as it was sent, what it paid for,
/// and the facilitator its authorization names.
#[derive(serde::Serialize, serde::Deserialize)]
struct SettleTicket {
    payment: String,
    resource: ResourceInfo,
    facilitator: Address,
}

/// The ticket of an `upto` payment, as its row keeps it; `None` for other schemes.
pub(super) fn settle_ticket(payment: &Payment, resource: &ResourceInfo) -> Option<String> {
    let OfferScheme::Upto { facilitator } = payment.offer.scheme else { return None };
    let ticket = SettleTicket { payment: payment.payload.encode(), resource: resource.clone(), facilitator };
    serde_json::to_string(&ticket).ok()
}

/// The rows of the streams this process is serving, each with how many streams serve it (a row released and
/// paid again may start its next stream before the last one's task has ended): reconciliation leaves them be.
#[derive(Default)]
pub(super) struct LiveStreams(Mutex<HashMap<i64, usize>>);

/// One row in [`LiveStreams`], until it is dropped.
pub(super) struct LiveStream {
    streams: Arc<LiveStreams>,
    id: i64,
}

impl LiveStreams {
    pub(super) fn enter(self: &Arc<Self>, id: i64) -> LiveStream {
        if let Ok(mut ids) = self.0.lock() {
            *ids.entry(id).or_default() += 1;
        }
        LiveStream { streams: self.clone(), id }
    }

    /// Whether `id` is one of this process's streams (a poisoned lock says yes: leave the row alone).
    fn serving(&self, id: i64) -> bool {
        self.0.lock().map_or(true, |ids| ids.contains_key(&id))
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        if let Ok(mut ids) = self.streams.0.lock() {
            if let Some(count) = ids.get_mut(&self.id) {
                *count -= 1;
                if *count == 0 {
                    ids.remove(&self.id);
                }
            }
        }
    }
}

/// What a stream's row has been told of what went out, and when it is told next.
pub(super) struct Progress {
    /// Written with the first price: before anything went out there is nothing to charge.
    ticket: Option<String>,
    /// The price of what has gone out.
    sent: U256,
    recorded: U256,
    next: Instant,
}

impl Progress {
    pub(super) fn new(ticket: Option<String>) -> Progress {
        // A stream over within the first period writes nothing for this.
        Progress { ticket, sent: U256::ZERO, recorded: U256::ZERO, next: Instant::now() + PROGRESS_EVERY }
    }

    /// What has gone out now comes to `charge`.
    pub(super) fn sent(&mut self, charge: U256) {
        self.sent = self.sent.max(charge);
    }

    /// When the row is to hear of what went out since it last did; `None` when it knows.
    pub(super) fn due(&self) -> Option<tokio::time::Instant> {
        (self.sent > self.recorded).then(|| tokio::time::Instant::from_std(self.next))
    }
}

#[derive(Debug, thiserror::Error)]
enum Unsettled {
    #[error("its settle ticket does not parse: {0}")]
    Ticket(String),
    #[error("its route no longer offers per-token prices on this network, asset and payee")]
    RouteGone,
    #[error("its payment no longer matches the route's offer: {0}")]
    Payment(Rejection),
    #[error("no facilitator settles this network")]
    NoFacilitator,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("the settlement failed: {0}")]
    Settlement(String),
}

impl Gateway {
    /// Tells a stream's row the price of what has gone out (with its ticket, the first time). Awaited in the
    /// stream's task, so the final charge is always written after the last progress.
    pub(super) async fn record_progress(&self, id: i64, progress: &mut Progress) {
        let written = match &progress.ticket {
            Some(ticket) => self.ledger.streaming(id, ticket.clone(), progress.sent).await,
            None => self.ledger.metered(id, progress.sent, None).await,
        };
        // Tried again at the next period if it failed: the row must not be left without its ticket.
        if written.is_ok() {
            progress.ticket = None;
            progress.recorded = progress.sent;
        }
        self.record(written);
        progress.next = Instant::now() + PROGRESS_EVERY;
    }

    /// Settles the streams a run that is gone left unsettled, each for the price of what it had sent. A row
    /// that cannot be sent to settlement yet (its route or facilitator gone) is tried again at the next pass,
    /// until its permit lapses; a settlement refused before any broadcast, a few times over a few seconds;
    /// then the row is `failed` (or `settling`, when its transaction may be out), and served: its
    /// authorization never pays for another answer.
    pub(super) async fn settle_interrupted_streams(&self) {
        let rows = match self.ledger.in_state(State::Verified).await {
            Ok(rows) => rows,
            Err(err) => return tracing::error!("interrupted streams cannot be read from the ledger: {err}"),
        };
        let live = self.live();
        for row in rows {
            // Read for each row: those before it may each have waited for a receipt.
            if !self.interrupted(&row, unix_now()) {
                continue;
            }
            match self.settle_interrupted(&live, &row).await {
                Ok(settled) => tracing::warn!(
                    id = row.id,
                    payer = %row.payer,
                    charged = %row.charge(),
                    transaction = %settled.transaction,
                    "settled a stream the gateway stopped in the middle of, for what it had sent",
                ),
                Err(err) => {
                    tracing::warn!(id = row.id, payer = %row.payer, "a stream the gateway stopped in the middle of is not settled yet: {err}")
                }
            }
        }
    }

    /// A streamed row no request of this process is serving, with something to charge and time to settle it.
    fn interrupted(&self, row: &Row, now: u64) -> bool {
        row.settle_ticket.is_some()
            && row.charged.is_some_and(|charged| !charged.is_zero())
            && row.valid_before > now.saturating_add(SETTLE_MIN_LEFT_SECS)
            && !self.streams.serving(row.id)
    }

    async fn settle_interrupted(&self, live: &Live, row: &Row) -> Result<Settled, Unsettled> {
        let stored = row.settle_ticket.as_ref().map_or("", |ticket| ticket.0.as_str());
        let ticket: SettleTicket = serde_json::from_str(stored).map_err(|err| Unsettled::Ticket(err.to_string()))?;
        // The offer is rebuilt from the route as configured now: the payment must still match it.
        let (paid, template) = live
            .routes
            .routes()
            .iter()
            .filter(|route| *route.pattern_text == *row.route)
            .filter_map(|route| route.payment.as_ref())
            .find_map(|paid| {
                let Pricing::PerToken(metering) = &paid.pricing else { return None };
                let template = metering.offers.iter().find(|offer| {
                    offer.network.chain_id == row.chain_id
                        && offer.asset.address == row.asset
                        && offer.pay_to == row.payee
                })?;
                Some((paid, template))
            })
            .ok_or(Unsettled::RouteGone)?;
        let offer = template.upto(row.amount, ticket.facilitator);
        let payment = self.gate.reopen(&offer, ticket.payment.as_bytes()).map_err(Unsettled::Payment)?;
        let auth = &payment.authorization;
        if (auth.payer(), auth.nonce()) != (row.payer, row.nonce) {
            return Err(Unsettled::Ticket("it is another payment's".into()));
        }
        let facilitator = live.facilitators.get(&paid.facilitator, row.chain_id).ok_or(Unsettled::NoFacilitator)?;
        // After a restart a remote facilitator has not announced its signers yet: its members are found by them.
        if facilitator.upto_signer(row.chain_id).is_none() {
            facilitator.learn_upto_signers().await;
        }
        let charge = row.charge();
        self.ledger.settling(row.id, None).await?;
        // Its answer went out: whatever the settlement does, the authorization never pays for another.
        self.record(self.ledger.served(row.id).await);
        let started = Instant::now();
        let mut attempt = 1;
        let outcome = loop {
            let before = record_hash_before(self.ledger.clone(), row.id);
            let outcome = facilitator.settle(&payment, &ticket.resource, charge, Some(before)).await;
            let time_left = auth.settle_by() > unix_now().saturating_add(SETTLE_MIN_LEFT_SECS + RETRY_PAUSE.as_secs());
            match outcome {
                // Refused before any broadcast (a mined revert names its transaction, and would only cost gas again).
                Err(failure)
                    if failure.nothing_moved
                        && failure.transaction.is_none()
                        && attempt < SETTLE_ATTEMPTS
                        && time_left =>
                {
                    tracing::warn!(id = row.id, reason = %failure.reason, "an interrupted stream's settlement was refused before any broadcast; trying again");
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                outcome => break outcome,
            }
        };
        match outcome {
            Ok(settled) => {
                self.record(self.ledger.settled(row.id, settled.transaction.clone()).await);
                self.metrics.settled(&row.route, "success", started.elapsed());
                let amount = u64::try_from(charge).unwrap_or(u64::MAX);
                self.metrics.revenue(&row.route, &offer.network.caip2, &offer.asset.address.to_string(), amount);
                Ok(settled)
            }
            Err(failure) => {
                self.metrics.settled(&row.route, &failure.reason, started.elapsed());
                if failure.nothing_moved {
                    // Served, so its authorization stays spent: it paid for nothing it delivered.
                    self.record(self.ledger.failed(row.id, failure.reason.clone(), failure.transaction.clone()).await);
                } else if let Some(transaction) = &failure.transaction {
                    // Left `settling`: reconciliation decides it by the chain.
                    self.record(self.ledger.pending(row.id, transaction.clone()).await);
                }
                Err(Unsettled::Settlement(failure.reason))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Progress, PROGRESS_EVERY};
    use alloy::primitives::U256;

    #[test]
    fn progress_is_due_a_period_in_and_only_when_more_went_out() {
        let mut progress = Progress::new(Some("ticket".into()));
        assert_eq!(progress.due(), None, "nothing went out");
        let start = tokio::time::Instant::now();
        progress.sent(U256::from(5));
        let due = progress.due().expect("something to tell");
        assert!(due > start && due <= start + PROGRESS_EVERY, "a stream shorter than a period writes nothing");
        progress.sent(U256::from(3));
        assert_eq!(progress.sent, U256::from(5), "what went out never shrinks");
        progress.recorded = progress.sent;
        assert_eq!(progress.due(), None, "the row knows");
    }
}
