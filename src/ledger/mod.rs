//! The payment ledger: a durable row per payment (SQLite in WAL mode), moved through explicit states.
//! Each state is committed before the step it records has a visible effect (write-ahead), so a process killed at
//! any instant leaves rows that say what to do next; `reconcile` does it.

mod reconcile;
mod store;
mod writer;

pub use reconcile::{reconcile, Reconciled};
pub use store::{Ledger, LedgerError, NewPayment, Revenue, Row};

/// Where a payment is. `verified → settling → settled | failed | refund_needed`; `released` when the answer
/// failed and nothing was charged (the authorization may be used again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Verified,
    Settling,
    Settled,
    Failed,
    RefundNeeded,
    Released,
}

impl State {
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
        [State::Verified, State::Settling, State::Settled, State::Failed, State::RefundNeeded, State::Released]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}
