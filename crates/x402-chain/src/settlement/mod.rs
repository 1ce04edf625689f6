//! Settlement: turning a verified payment into money. A facilitator is either the gateway itself
//! (`local`: alloy, the operator's gas-paying key) or a remote one over the standard HTTP API.

mod limiter;
mod local;
mod queue;
mod receipts;
mod remote;
mod remotes;
mod simulations;
mod upto;

pub use local::LocalSettler;
pub use queue::BeforeBroadcast;
pub use remote::RemoteFacilitator;
pub use remotes::FacilitatorState;
pub use upto::{settled_amount, UptoTerms};

use crate::chain;
use crate::options::{FacilitatorChoice, RemoteSet, SettlementOptions, SettlerConfig};
use alloy::primitives::{Address, U256};
use remotes::{Member, Probes, RemoteGroup};
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
    /// Each remote facilitator once (by URL and `auth`), whichever routes name it.
    members: Vec<Arc<Member>>,
    /// Each route's set of remote facilitators.
    groups: Vec<(Arc<RemoteSet>, RemoteGroup)>,
    /// Each remote facilitator alone, for a payment that must settle there.
    alone: Vec<RemoteGroup>,
    /// Keeps their health current while this configuration serves.
    _probes: Option<Probes>,
}

/// What `/readyz` reports.
pub struct Readiness {
    /// Every node, and every remote facilitator but one of a route that another of its facilitators serves.
    pub ready: bool,
    /// Each node's and remote facilitator's answer now, by name (never the RPC URL, which may carry a
    /// provider's key).
    pub checks: Vec<(String, Result<(), String>)>,
    pub facilitators: Vec<FacilitatorState>,
}

impl Facilitators {
    /// Must run inside the tokio runtime: local settlers start their transaction queues, remote facilitators
    /// their health probes. A settler of `previous` with the same chain, node and key keeps its queue under the
    /// new settings (two queues for one key would hand out the same account nonces); a remote facilitator of
    /// `previous` with the same URL, `auth` and settings keeps its limits and health.
    /// `remotes` are the sets of remote facilitators the routes name.
    pub fn new<'r>(
        settlers: &BTreeMap<u64, SettlerConfig>,
        settings: &SettlementOptions,
        remotes: impl IntoIterator<Item = &'r Arc<RemoteSet>>,
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
        let mut members: Vec<Arc<Member>> = Vec::new();
        let mut groups: Vec<(Arc<RemoteSet>, RemoteGroup)> = Vec::new();
        for set in remotes {
            if groups.iter().any(|(known, _)| **known == **set) {
                continue;
            }
            let mut group = Vec::new();
            for config in &set.facilitators {
                let member = match members.iter().find(|m| m.serves(config, settings)) {
                    Some(member) => member.clone(),
                    None => {
                        let kept = previous.and_then(|p| p.members.iter().find(|m| m.serves(config, settings)));
                        let member = kept.cloned().unwrap_or_else(|| Arc::new(Member::new(config, settings)));
                        members.push(member.clone());
                        member
                    }
                };
                group.push((member, config.weight));
            }
            groups.push((set.clone(), RemoteGroup::new(group)));
        }
        let alone = members.iter().map(|member| RemoteGroup::new(vec![(member.clone(), 1)])).collect();
        let probes = (!members.is_empty()).then(|| Probes::spawn(members.iter().map(Arc::downgrade).collect()));
        Facilitators { local, members, groups, alone, _probes: probes }
    }

    /// The facilitator for an offer; configuration validation guarantees there is one.
    pub fn get(&self, choice: &FacilitatorChoice, chain_id: u64) -> Option<&dyn Facilitator> {
        match choice {
            FacilitatorChoice::Local => self.local.get(&chain_id).map(|s| &**s as &dyn Facilitator),
            FacilitatorChoice::Remote(set) => self
                .groups
                .iter()
                .find(|(known, _)| Arc::ptr_eq(known, set) || **known == **set)
                .map(|(_, group)| group as &dyn Facilitator),
        }
    }

    /// The remote facilitator at `url` alone: for a payment whose authorization names its settler, which no
    /// other facilitator may settle (`upto`). It keeps its limits, health and retries, and never fails over.
    pub fn pinned(&self, url: &str) -> Option<&dyn Facilitator> {
        let position = self.members.iter().position(|member| member.url() == url)?;
        self.alone.get(position).map(|group| group as &dyn Facilitator)
    }

    /// Asks every node and remote facilitator now. A route is ready while one of its facilitators answers.
    pub async fn readiness(&self) -> Readiness {
        let mut checks = Vec::new();
        for (chain_id, settler) in &self.local {
            checks.push((format!("rpc eip155:{chain_id}"), settler.probe().await));
        }
        let mut ready = checks.iter().all(|(_, answer)| answer.is_ok());
        let mut answering = Vec::new();
        for (member, name) in self.members.iter().zip(self.names()) {
            let answer = member.probe().await;
            if answer.is_ok() {
                answering.push(member);
            }
            checks.push((format!("facilitator {name}"), answer));
        }
        ready &=
            self.groups.iter().all(|(_, group)| group.members().any(|m| answering.iter().any(|a| Arc::ptr_eq(a, m))));
        Readiness { ready, checks, facilitators: self.states() }
    }

    /// Each remote facilitator's state, as it stands.
    pub fn states(&self) -> Vec<FacilitatorState> {
        self.members.iter().zip(self.names()).map(|(member, name)| member.state(name)).collect()
    }

    /// Each remote facilitator's redacted URL, told apart by `#2`, `#3` when two redact alike (one host, two
    /// keys).
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::with_capacity(self.members.len());
        for member in &self.members {
            let shown = member.client().shown_url();
            let seen = names.iter().filter(|name| name.split(" #").next() == Some(shown)).count();
            names.push(if seen == 0 { shown.to_string() } else { format!("{shown} #{}", seen + 1) });
        }
        names
    }

    /// Every remote facilitator, by URL.
    pub fn remotes(&self) -> impl Iterator<Item = (&str, &RemoteFacilitator)> {
        self.members.iter().map(|member| (member.url(), member.client()))
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
        facilitator_max_concurrency: 32,
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

    #[tokio::test]
    async fn a_pinned_facilitator_is_that_one_alone_and_a_route_gets_its_whole_set() {
        let set = |urls: &[&str]| {
            let one = |url: &&str| crate::options::RemoteConfig { url: url.to_string(), auth: None, weight: 1 };
            Arc::new(RemoteSet { facilitators: urls.iter().map(one).collect() })
        };
        let (both, alone) = (set(&["http://127.0.0.1:1", "http://127.0.0.1:2/v2/KEY"]), set(&["http://127.0.0.1:1"]));
        let facilitators = Facilitators::new(&BTreeMap::new(), &OPTIONS, [&both, &alone], None);
        assert_eq!(facilitators.states().len(), 2, "one facilitator for each URL");
        let route = facilitators
            .get(&FacilitatorChoice::Remote(set(&["http://127.0.0.1:1", "http://127.0.0.1:2/v2/KEY"])), 84532);
        assert_eq!(route.expect("the route's set").name(), "http://127.0.0.1:1, http://127.0.0.1:2/<redacted>");
        let pinned = facilitators.pinned("http://127.0.0.1:2/v2/KEY").expect("a configured facilitator");
        assert_eq!(pinned.name(), "http://127.0.0.1:2/<redacted>");
        assert!(facilitators.pinned("http://127.0.0.1:3").is_none(), "only one the configuration names");
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
