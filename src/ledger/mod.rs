//! The payment ledger: a durable row per payment (SQLite in WAL mode), moved through explicit states.
//! Each state is committed before the step it records has a visible effect (write-ahead), so a process killed at
//! any instant leaves rows that say what to do next; `reconcile` does it.

mod reconcile;
mod store;
mod writer;

pub use reconcile::{reconcile, Reconciled};
pub use store::{Ledger, LedgerError, NewPayment, Revenue, Row};

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
}

impl Step {
    pub fn allowed_from(self) -> &'static [State] {
        use State::*;
        match self {
            Step::Reverified => &[Released, Failed],
            Step::Settling | Step::Released => &[Verified],
            Step::Pending => &[Settling],
            Step::Settled | Step::Failed => &[Settling, Verified],
            Step::RefundNeeded => &[Settled, Settling],
            Step::Served => &[Settled, RefundNeeded, Settling],
            Step::LandedLate => &[Failed],
        }
    }

    /// The state the row is left in; `None` where it keeps its state (`pending`), or where the step decides
    /// from the row (`served` turns a refund owed only for want of the answer back into `settled`).
    pub fn to(self) -> Option<State> {
        match self {
            Step::Reverified => Some(State::Verified),
            Step::Settling => Some(State::Settling),
            Step::Pending | Step::Served => None,
            Step::Settled => Some(State::Settled),
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
            Step::Settling,
            Step::Pending,
            Step::Settled,
            Step::Failed,
            Step::Released,
            Step::RefundNeeded,
            Step::Served,
            Step::LandedLate,
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
