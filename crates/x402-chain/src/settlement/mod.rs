//! Settlement: turning a verified payment into money. A facilitator is either the gateway itself
//! (`local`: alloy, the operator's gas-paying key) or a remote one over the standard HTTP API.

mod local;
mod queue;
mod receipts;
mod remote;
mod simulations;
mod upto;

pub use local::LocalSettler;
pub use queue::BeforeBroadcast;
pub use remote::RemoteFacilitator;

use crate::chain;
use crate::options::{FacilitatorChoice, RemoteConfig, SettlementOptions, SettlerConfig};
use alloy::primitives::{Address, U256};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use x402_proto::codec::PaymentPayload;
use x402_proto::requirements::{requirements_v1, requirements_v2};
use x402_proto::wire::ResourceInfo;
use x402_proto::Rejection;
use x402_proto::{Authorization, Offer, Payment};

/// Time allowed for one RPC request to a chain node.
const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// When a paid route settles, relative to calling the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleMode {
    /// Forward, buffer the answer, settle only if it succeeded; the buyer pays only for what is delivered.
    After,
    /// Settle first, then stream: for answers that cannot be buffered (SSE, large bodies).
    Before,
}

#[derive(Debug)]
pub enum VerifyFailure {
    /// The payment is not good: a 402 with this reason.
    Rejected(Rejection),
    /// Nobody could say (chain RPC or facilitator down): a 503, the payment may be retried.
    Unavailable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Empty when nothing was owed (an `upto` charge of 0 sends no transaction).
    pub transaction: String,
    /// What was charged, for schemes that charge less than the buyer authorized (`upto`).
    pub amount: Option<U256>,
}

impl Settled {
    pub fn exact(transaction: String) -> Settled {
        Settled { transaction, amount: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleFailure {
    /// x402 `errorReason`.
    pub reason: String,
    pub message: String,
    pub transaction: Option<String>,
    /// Whether it is certain that no transfer happened, so the authorization may be used again.
    pub nothing_moved: bool,
}

impl SettleFailure {
    fn nothing_moved(reason: &str, message: String, transaction: Option<String>) -> SettleFailure {
        SettleFailure { reason: reason.into(), message, transaction, nothing_moved: true }
    }

    /// Sent but not confirmed in time: it may still land, so the authorization stays spent.
    fn pending(transaction: String) -> SettleFailure {
        SettleFailure {
            reason: "settlement_pending".into(),
            message: "the settlement transaction was sent but not confirmed in time; it may still land".into(),
            transaction: Some(transaction),
            nothing_moved: false,
        }
    }

    /// No usable answer from a remote facilitator after asking it to settle.
    fn unknown(why: &str) -> SettleFailure {
        SettleFailure {
            reason: "unexpected_settle_error".into(),
            message: format!("facilitator: {why}"),
            transaction: None,
            nothing_moved: false,
        }
    }
}

/// What verifies and settles a payment: the in-process settler ([`LocalSettler`]) or a remote facilitator
/// ([`RemoteFacilitator`]).
pub trait Facilitator: Send + Sync {
    /// How the ledger names it: `local`, or the remote facilitator's URL, redacted.
    fn name(&self) -> String;

    fn verify<'a>(&'a self, payment: &'a Payment, resource: &'a ResourceInfo)
        -> Pending<'a, Result<(), VerifyFailure>>;

    /// Settles `amount`: the price (`exact`), or at most the ceiling and never 0 (`upto`). A local settler calls
    /// `before` with the transaction's hash before broadcasting it.
    fn settle<'a>(
        &'a self,
        payment: &'a Payment,
        resource: &'a ResourceInfo,
        amount: U256,
        before: Option<BeforeBroadcast>,
    ) -> Pending<'a, Result<Settled, SettleFailure>>;

    /// The address `upto` authorizations on `chain_id` must name as their facilitator (only it can settle
    /// them); `None` when this facilitator cannot settle `upto` there, or has not said yet.
    fn upto_signer(&self, chain_id: u64) -> Option<Address>;

    /// Asks again which addresses it settles `upto` with, where it can say (a remote facilitator's
    /// `/supported`), at a bounded rate.
    fn learn_upto_signers(&self) -> Pending<'_, ()> {
        Box::pin(async {})
    }
}

/// A facilitator's answer on its way.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Facilitator for LocalSettler {
    fn name(&self) -> String {
        "local".into()
    }

    fn verify<'a>(&'a self, payment: &'a Payment, _: &'a ResourceInfo) -> Pending<'a, Result<(), VerifyFailure>> {
        match &payment.authorization {
            Authorization::Exact(auth) => Box::pin(LocalSettler::verify(self, payment.offer.asset.address, auth)),
            Authorization::Upto(auth) => Box::pin(LocalSettler::verify_upto(self, auth)),
        }
    }

    fn settle<'a>(
        &'a self,
        payment: &'a Payment,
        _: &'a ResourceInfo,
        amount: U256,
        before: Option<BeforeBroadcast>,
    ) -> Pending<'a, Result<Settled, SettleFailure>> {
        match &payment.authorization {
            Authorization::Exact(auth) => {
                Box::pin(LocalSettler::settle(self, payment.offer.asset.address, auth, before))
            }
            Authorization::Upto(auth) => Box::pin(LocalSettler::settle_upto(self, auth, amount, before)),
        }
    }

    fn upto_signer(&self, chain_id: u64) -> Option<Address> {
        (chain_id == self.chain_id()).then(|| self.address())
    }
}

impl Facilitator for RemoteFacilitator {
    fn name(&self) -> String {
        self.shown_url().to_string()
    }

    fn verify<'a>(
        &'a self,
        payment: &'a Payment,
        resource: &'a ResourceInfo,
    ) -> Pending<'a, Result<(), VerifyFailure>> {
        Box::pin(async move { RemoteFacilitator::verify(self, &remote_body(payment, &payment.offer, resource)).await })
    }

    /// A remote facilitator broadcasts itself: there is no hash to record before. The requirements carry the
    /// amount to settle, which `upto` allows below the ceiling the buyer signed.
    fn settle<'a>(
        &'a self,
        payment: &'a Payment,
        resource: &'a ResourceInfo,
        amount: U256,
        _: Option<BeforeBroadcast>,
    ) -> Pending<'a, Result<Settled, SettleFailure>> {
        Box::pin(async move {
            let mut offer = payment.offer.clone();
            offer.amount = amount;
            RemoteFacilitator::settle(self, &remote_body(payment, &offer, resource)).await
        })
    }

    fn upto_signer(&self, chain_id: u64) -> Option<Address> {
        self.upto_signer(chain_id)
    }

    fn learn_upto_signers(&self) -> Pending<'_, ()> {
        Box::pin(RemoteFacilitator::learn_upto_signers(self))
    }
}

/// The buyer's payload as received, and our own `offer` as the requirements (never the client's copy).
fn remote_body(payment: &Payment, offer: &Offer, resource: &ResourceInfo) -> serde_json::Value {
    let (payload, requirements) = match &payment.payload {
        PaymentPayload::V2(p) => (serde_json::to_value(p), serde_json::to_value(requirements_v2(offer))),
        PaymentPayload::V1(p) => (serde_json::to_value(p), serde_json::to_value(requirements_v1(offer, resource))),
    };
    RemoteFacilitator::body(payment.version, &payload.unwrap_or_default(), &requirements.unwrap_or_default())
}

/// Every facilitator the configuration uses, built once.
pub struct Facilitators {
    /// Shared with the configurations that follow a reload, so one key keeps one transaction queue.
    local: HashMap<u64, Arc<LocalSettler>>,
    remote: HashMap<String, RemoteFacilitator>,
}

impl Facilitators {
    /// Must run inside the tokio runtime: local settlers start their transaction queues. A settler of
    /// `previous` with the same chain, node and key keeps its queue under the new settings (two queues for
    /// one key would hand out the same account nonces).
    /// `remotes` are the remote facilitators the routes name (one facilitator for each URL).
    pub fn new<'r>(
        settlers: &BTreeMap<u64, SettlerConfig>,
        settings: &SettlementOptions,
        remotes: impl IntoIterator<Item = &'r RemoteConfig>,
        previous: Option<&Facilitators>,
    ) -> Facilitators {
        let local = settlers
            .iter()
            .map(|(chain_id, settler)| {
                let kept = previous
                    .and_then(|p| p.local.get(chain_id))
                    .filter(|old| old.serves(&settler.rpc_url, settler.key.address()));
                let local = match kept {
                    Some(old) => old.reconfigured(settler, settings),
                    None => {
                        LocalSettler::new(chain::connect(&settler.rpc_url, RPC_TIMEOUT), settler, *chain_id, settings)
                    }
                };
                (*chain_id, Arc::new(local))
            })
            .collect();
        let mut remote = HashMap::new();
        for config in remotes {
            remote.entry(config.url.clone()).or_insert_with(|| {
                RemoteFacilitator::new(config.url.clone(), config.auth.clone(), settings.facilitator_timeout)
            });
        }
        Facilitators { local, remote }
    }

    /// The facilitator for an offer; configuration validation guarantees there is one.
    pub fn get(&self, choice: &FacilitatorChoice, chain_id: u64) -> Option<&dyn Facilitator> {
        match choice {
            FacilitatorChoice::Local => self.local.get(&chain_id).map(|s| &**s as &dyn Facilitator),
            FacilitatorChoice::Remote(config) => self.remote.get(&config.url).map(|r| r as &dyn Facilitator),
        }
    }

    /// Readiness of every node and facilitator this configuration settles with, by name (never the RPC URL,
    /// which may carry a provider's key).
    pub async fn readiness(&self) -> Vec<(String, Result<(), String>)> {
        let mut checks = Vec::new();
        for (chain_id, settler) in &self.local {
            checks.push((format!("rpc eip155:{chain_id}"), settler.probe().await));
        }
        for remote in self.remote.values() {
            let answer = match tokio::time::timeout(local::PROBE_TIMEOUT, remote.supported()).await {
                Err(_) => Err("did not answer in time".to_string()),
                Ok(answer) => answer.map(|_| ()),
            };
            checks.push((format!("facilitator {}", remote.shown_url()), answer));
        }
        checks
    }

    pub fn remotes(&self) -> impl Iterator<Item = (&String, &RemoteFacilitator)> {
        self.remote.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A settler on Base Sepolia with one fixed key, reaching its node at `rpc_url`.
    fn settlers(rpc_url: &str) -> BTreeMap<u64, SettlerConfig> {
        let key = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a".parse().expect("a key");
        let settler = SettlerConfig {
            rpc_url: rpc_url.parse().expect("a URL"),
            key,
            multicall: alloy::primitives::address!("cA11bde05977b3631167028862bE2a173976CA11"),
        };
        BTreeMap::from([(84532, settler)])
    }

    const OPTIONS: SettlementOptions = SettlementOptions {
        settle_timeout: Duration::from_secs(60),
        facilitator_timeout: Duration::from_secs(30),
        settle_batch: None,
    };

    #[tokio::test]
    async fn a_reload_keeps_the_settler_and_queue_of_an_unchanged_key() {
        let before = Facilitators::new(&settlers("http://127.0.0.1:1"), &OPTIONS, [], None);
        let after = Facilitators::new(&settlers("http://127.0.0.1:1"), &OPTIONS, [], Some(&before));
        assert!(before.local[&84532].shares_queue_with(&after.local[&84532]), "one key, one queue");
        let elsewhere = Facilitators::new(&settlers("http://127.0.0.1:2"), &OPTIONS, [], Some(&after));
        assert!(!after.local[&84532].shares_queue_with(&elsewhere.local[&84532]), "another node, another queue");
    }

    #[test]
    fn settlement_reasons_are_metric_labels() {
        let failures = [
            SettleFailure::pending("0x01".into()),
            SettleFailure::unknown("no answer"),
            SettleFailure::nothing_moved("invalid_exact_evm_transaction_failed", String::new(), None),
            SettleFailure::nothing_moved("invalid_exact_evm_payload_authorization_valid_before", String::new(), None),
        ];
        for failure in failures {
            assert_eq!(x402_proto::reason_label(&failure.reason), failure.reason);
        }
    }
}
