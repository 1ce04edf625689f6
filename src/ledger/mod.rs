//! The payment ledger: a durable row per payment (SQLite in WAL mode), moved through explicit states.
//! Each state is committed before the step it records has a visible effect (write-ahead), so a process killed at
//! any instant leaves rows that say what to do next; `reconcile` does it.

mod reconcile;
mod store;
mod writer;

pub use reconcile::{reconcile, Reconciled, OTHER_TERMS, SPENT_UNPAID};
pub use store::{Ledger, LedgerError, NewPayment, Revenue, Row, StoredTicket};

use alloy::primitives::{Address, B256, U256};
use std::future::Future;
use std::pin::Pin;

/// Where a payment is. `verified → settling → settled | failed | refund_needed`; `released` when the answer
/// failed and nothing was charged (the authorization may be used again). Stored as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Verified,
    Settling,
    Settled,
    Failed,
    RefundNeeded,
    Released,
}

impl State {
    const ALL: [State; 6] =
        [State::Verified, State::Settling, State::Settled, State::Failed, State::RefundNeeded, State::Released];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Verified => "verified",
            State::Settling => "settling",
            State::Settled => "settled",
            State::Failed => "failed",
            State::RefundNeeded => "refund_needed",
            State::Released => "released",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The buyer was charged: the money moved to the payee.
    pub fn charged(self) -> bool {
        matches!(self, State::Settled | State::RefundNeeded)
    }

    /// Certainly not charged: the authorization may be used again.
    pub fn never_charged(self) -> bool {
        matches!(self, State::Failed | State::Released)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl PartialEq<&str> for State {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Every change the ledger makes to a row. Which states each may start from, and where it leads, is the one
/// table of allowed transitions ([`Step::allowed_from`], [`Step::to`]); a row in any other state is a conflict,
/// never overwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// An authorization seen before and never charged is verified again.
    Reverified,
    /// An `upto` answer is going out before its payment settles: what settles it after a restart, and the
    /// price of what went out.
    Streaming,
    /// An `upto` payment's charge, metered from its answer, before it settles (or, while it streams, what
    /// has gone out so far).
    Metered,
    /// About to settle, before anything is broadcast.
    Settling,
    /// A settlement transaction's hash, written before it is broadcast.
    Pending,
    Settled,
    /// Certainly no money moved.
    Failed,
    /// The answer failed before any settlement.
    Released,
    RefundNeeded,
    /// The paid answer was handed over whole; a refund owed only for want of it is cancelled.
    Served,
    /// A row recorded failed whose authorization was landed by someone else.
    LandedLate,
    /// A row recorded failed, whose answer had gone out (a stream), settled after all.
    SettledLate,
}

impl Step {
    pub fn allowed_from(self) -> &'static [State] {
        use State::*;
        match self {
            Step::Reverified => &[Released, Failed],
            Step::Streaming | Step::Metered | Step::Settling | Step::Released => &[Verified],
            Step::Pending => &[Settling],
            Step::Settled | Step::Failed => &[Settling, Verified],
            Step::RefundNeeded => &[Settled, Settling],
            Step::Served => &[Settled, RefundNeeded, Settling],
            Step::LandedLate | Step::SettledLate => &[Failed],
        }
    }

    /// The state the row is left in; `None` where it keeps its state (`pending`), or where the step decides
    /// from the row (`served` turns a refund owed only for want of the answer back into `settled`).
    pub fn to(self) -> Option<State> {
        match self {
            Step::Reverified => Some(State::Verified),
            Step::Settling => Some(State::Settling),
            Step::Streaming | Step::Metered | Step::Pending | Step::Served => None,
            Step::Settled | Step::SettledLate => Some(State::Settled),
            Step::Failed => Some(State::Failed),
            Step::Released => Some(State::Released),
            Step::RefundNeeded | Step::LandedLate => Some(State::RefundNeeded),
        }
    }

    /// `state IN (...)` for this step's starting states, as SQL.
    fn guard_sql(self) -> String {
        let names: Vec<String> = self.allowed_from().iter().map(|s| format!("'{}'", s.as_str())).collect();
        format!("state IN ({})", names.join(", "))
    }
}

/// Where payments are recorded, each state before the step it records: SQLite ([`Ledger`]) today, a
/// database that replicas share next. Every step is allowed only from the states [`Step`] lists for it; a
/// row in another state is a [`LedgerError::Conflict`].
pub trait PaymentStore: Send + Sync {
    /// Records a verified payment: its row id, or the row of an authorization already spent or settling.
    fn record_verified(&self, p: NewPayment) -> Stored<'_, Result<i64, Row>>;

    /// About to settle, before anything is broadcast.
    fn settling(&self, id: i64, upstream_status: Option<u16>) -> Stored<'_, ()>;

    /// An `upto` payment's metered charge and the usage (prompt, completion tokens) it was priced from.
    fn metered(&self, id: i64, charged: U256, usage: Option<(u64, u64)>) -> Stored<'_, ()>;

    /// An answer going out before its payment settles, `charged` so far: `ticket` settles it if the gateway
    /// stops first.
    fn streaming(&self, id: i64, ticket: String, charged: U256) -> Stored<'_, ()>;

    /// A settlement transaction's hash, before it is broadcast.
    fn pending(&self, id: i64, transaction: String) -> Stored<'_, ()>;

    fn settled(&self, id: i64, transaction: String) -> Stored<'_, ()>;

    /// Certainly no money moved.
    fn failed(&self, id: i64, reason: String, transaction: Option<String>) -> Stored<'_, ()>;

    /// The answer failed before any settlement: nothing charged.
    fn released(&self, id: i64, upstream_status: Option<u16>) -> Stored<'_, ()>;

    fn refund_needed(&self, id: i64, reason: String) -> Stored<'_, ()>;

    /// The paid answer was handed over whole.
    fn served(&self, id: i64) -> Stored<'_, ()>;

    /// A row recorded failed whose authorization was landed by someone else.
    fn landed_late(&self, id: i64, transaction: String) -> Stored<'_, ()>;

    /// A row recorded failed, whose answer had gone out, settled after all by `transaction`.
    fn settled_late(&self, id: i64, transaction: String) -> Stored<'_, ()>;

    /// The row of one authorization.
    fn find(&self, chain_id: u64, asset: Address, payer: Address, nonce: B256) -> Stored<'_, Option<Row>>;

    fn get(&self, id: i64) -> Stored<'_, Option<Row>>;

    /// Rows filtered by state, route and payer (each optional), newest first.
    fn list(
        &self,
        state: Option<State>,
        route: Option<String>,
        payer: Option<String>,
        limit: u32,
    ) -> Stored<'_, Vec<Row>>;

    fn in_state(&self, state: State) -> Stored<'_, Vec<Row>>;

    /// `failed` rows whose authorization is, or was until `since`, still valid.
    fn failed_valid_since(&self, since: u64) -> Stored<'_, Vec<Row>>;

    /// Authorizations that must stay refused after a restart.
    fn unexpired_spent(&self, now: u64) -> Stored<'_, Vec<Row>>;

    /// Settled revenue by route, UTC day, network and asset.
    fn revenue(&self) -> Stored<'_, Vec<Revenue>>;
}

/// A store's answer on its way.
pub type Stored<'a, T> = Pin<Box<dyn Future<Output = Result<T, LedgerError>> + Send + 'a>>;

impl PaymentStore for Ledger {
    fn record_verified(&self, p: NewPayment) -> Stored<'_, Result<i64, Row>> {
        Box::pin(Ledger::record_verified(self, p))
    }

    fn settling(&self, id: i64, upstream_status: Option<u16>) -> Stored<'_, ()> {
        Box::pin(Ledger::settling(self, id, upstream_status))
    }

    fn metered(&self, id: i64, charged: U256, usage: Option<(u64, u64)>) -> Stored<'_, ()> {
        Box::pin(Ledger::metered(self, id, charged, usage))
    }

    fn streaming(&self, id: i64, ticket: String, charged: U256) -> Stored<'_, ()> {
        Box::pin(Ledger::streaming(self, id, ticket, charged))
    }

    fn pending(&self, id: i64, transaction: String) -> Stored<'_, ()> {
        Box::pin(Ledger::pending(self, id, transaction))
    }

    fn settled(&self, id: i64, transaction: String) -> Stored<'_, ()> {
        Box::pin(Ledger::settled(self, id, transaction))
    }

    fn failed(&self, id: i64, reason: String, transaction: Option<String>) -> Stored<'_, ()> {
        Box::pin(Ledger::failed(self, id, reason, transaction))
    }

    fn released(&self, id: i64, upstream_status: Option<u16>) -> Stored<'_, ()> {
        Box::pin(Ledger::released(self, id, upstream_status))
    }

    fn refund_needed(&self, id: i64, reason: String) -> Stored<'_, ()> {
        Box::pin(Ledger::refund_needed(self, id, reason))
    }

    fn served(&self, id: i64) -> Stored<'_, ()> {
        Box::pin(Ledger::served(self, id))
    }

    fn landed_late(&self, id: i64, transaction: String) -> Stored<'_, ()> {
        Box::pin(Ledger::landed_late(self, id, transaction))
    }

    fn settled_late(&self, id: i64, transaction: String) -> Stored<'_, ()> {
        Box::pin(Ledger::settled_late(self, id, transaction))
    }

    fn find(&self, chain_id: u64, asset: Address, payer: Address, nonce: B256) -> Stored<'_, Option<Row>> {
        Box::pin(Ledger::find(self, chain_id, asset, payer, nonce))
    }

    fn get(&self, id: i64) -> Stored<'_, Option<Row>> {
        Box::pin(Ledger::get(self, id))
    }

    fn list(
        &self,
        state: Option<State>,
        route: Option<String>,
        payer: Option<String>,
        limit: u32,
    ) -> Stored<'_, Vec<Row>> {
        Box::pin(Ledger::list(self, state, route, payer, limit))
    }

    fn in_state(&self, state: State) -> Stored<'_, Vec<Row>> {
        Box::pin(Ledger::in_state(self, state))
    }

    fn failed_valid_since(&self, since: u64) -> Stored<'_, Vec<Row>> {
        Box::pin(Ledger::failed_valid_since(self, since))
    }

    fn unexpired_spent(&self, now: u64) -> Stored<'_, Vec<Row>> {
        Box::pin(Ledger::unexpired_spent(self, now))
    }

    fn revenue(&self) -> Stored<'_, Vec<Revenue>> {
        Box::pin(Ledger::revenue(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for state in State::ALL {
            assert_eq!(State::parse(state.as_str()), Some(state));
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        assert_eq!(State::parse("Settled"), None);
    }

    #[test]
    fn no_step_leaves_a_charged_row_uncharged() {
        let steps = [
            Step::Reverified,
            Step::Streaming,
            Step::Metered,
            Step::Settling,
            Step::Pending,
            Step::Settled,
            Step::Failed,
            Step::Released,
            Step::RefundNeeded,
            Step::Served,
            Step::LandedLate,
            Step::SettledLate,
        ];
        for step in steps {
            for from in step.allowed_from() {
                let to = step.to().unwrap_or(*from);
                assert!(!(from.charged() && to.never_charged()), "{step:?} from {from}");
            }
        }
        assert_eq!(Step::Reverified.allowed_from(), [State::Released, State::Failed], "only the never charged");
    }
}
