//! What settling needs, as typed options: the gateway's configuration builds them, this crate never reads a
//! file.

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use http::{HeaderValue, Uri};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum FacilitatorChoice {
    /// Verify and settle in-process, with the network's `rpc_url` and `settler_key`.
    Local,
    Remote(Arc<RemoteSet>),
}

/// A route's remote facilitators (`facilitators = [...]`, or the one of `facilitator = "URL"`): any of them
/// can verify and settle an `exact` payment, so a call goes to the next when one is down or busy.
#[derive(Debug, PartialEq, Eq)]
pub struct RemoteSet {
    /// In the order of the file: after a weighted choice among the healthy ones, the order they are tried in.
    pub facilitators: Vec<RemoteConfig>,
}

#[derive(PartialEq, Eq)]
pub struct RemoteConfig {
    /// Without a trailing slash.
    pub url: String,
    /// `auth` (or `facilitator_auth`): sent as `Authorization`, marked sensitive.
    pub auth: Option<HeaderValue>,
    /// Its share of the calls, against the others' weights.
    pub weight: u32,
}

impl fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("url", &crate::redacted_url(&self.url))
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("weight", &self.weight)
            .finish()
    }
}

/// The chain access and gas-paying key of the in-process facilitator on one network.
pub struct SettlerConfig {
    /// May carry a node provider's key: never shown.
    pub rpc_url: Uri,
    pub key: PrivateKeySigner,
    /// The Multicall3 (`aggregate3`) contract that batched settlements go through.
    pub multicall: Address,
}

impl fmt::Debug for SettlerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SettlerConfig").field("address", &self.key.address()).finish_non_exhaustive()
    }
}

/// Local settlements that share one transaction, each allowed to fail alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Most payments in one transaction.
    pub max: usize,
    /// Longest a payment waits for others to share its transaction.
    pub window: Duration,
}

/// How settlements are made and waited for, on every network.
#[derive(Debug, Clone, Copy)]
pub struct SettlementOptions {
    /// Longest wait for a local settlement's receipt (the authorization's expiry may cut it shorter); past it,
    /// the payment is `settlement_pending` and reconciliation finishes it.
    pub settle_timeout: Duration,
    /// Time allowed for each call to a remote facilitator; also the longest a call waits for its turn.
    pub facilitator_timeout: Duration,
    /// The most calls in flight to one remote facilitator, however well it copes.
    pub facilitator_max_concurrency: usize,
    /// `None`: one transaction per payment.
    pub settle_batch: Option<BatchSettings>,
}
