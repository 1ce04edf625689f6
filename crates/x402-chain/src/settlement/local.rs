//! The in-process facilitator: simulates each authorization on chain before the request goes upstream, and
//! settles it with the gateway's own gas-paying key.

use super::queue::{Batching, BeforeBroadcast, SendError, Sent, TxQueue};
use super::receipts::Receipts;
use super::simulations::Simulations;
use super::{SettleFailure, Settled, VerifyFailure};
use crate::chain::{self, SimulationFailure};
use crate::options::{SettlementOptions, SettlerConfig};
use alloy::primitives::{Address, B256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::TransactionReceipt;
use http::Uri;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use x402_proto::exact_evm::VerifiedAuthorization;
use x402_proto::Rejection;

pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct LocalSettler {
    pub(super) provider: RootProvider,
    rpc_url: Uri,
    pub(super) settler: Address,
    chain_id: u64,
    pub(super) queue: TxQueue,
    receipts: Arc<Receipts>,
    receipt_timeout: Duration,
    batching: Option<Batching>,
    /// With batching, concurrent simulations share `eth_call`s too.
    simulations: Option<Simulations>,
    /// Whether the `upto` proxy was found deployed (`upto.rs`): a call to an address without code succeeds.
    pub(super) upto_proxy_seen: AtomicBool,
}

impl LocalSettler {
    /// Must run inside the tokio runtime: it starts the key's transaction queue.
    pub fn new(
        provider: RootProvider,
        config: &SettlerConfig,
        chain_id: u64,
        settings: &SettlementOptions,
    ) -> LocalSettler {
        let queue = TxQueue::spawn(provider.clone(), config.key.clone(), chain_id);
        LocalSettler::with_queue(provider, queue, config, chain_id, settings)
    }

    /// The same node, key and transaction queue under new settings (after a reload).
    pub fn reconfigured(&self, config: &SettlerConfig, settings: &SettlementOptions) -> LocalSettler {
        LocalSettler::with_queue(self.provider.clone(), self.queue.clone(), config, self.chain_id, settings)
    }

    fn with_queue(
        provider: RootProvider,
        queue: TxQueue,
        config: &SettlerConfig,
        chain_id: u64,
        settings: &SettlementOptions,
    ) -> LocalSettler {
        let batching = settings.settle_batch.map(|settings| Batching { multicall: config.multicall, settings });
        LocalSettler {
            simulations: batching.map(|b| Simulations::spawn(provider.clone(), config.key.address(), b)),
            receipts: Receipts::new(provider.clone(), settings.settle_timeout),
            provider,
            rpc_url: config.rpc_url.clone(),
            settler: config.key.address(),
            chain_id,
            queue,
            receipt_timeout: settings.settle_timeout,
            batching,
            upto_proxy_seen: AtomicBool::new(false),
        }
    }

    /// The settler's own address: what pays gas, and what `upto` authorizations name as their facilitator.
    pub fn address(&self) -> Address {
        self.settler
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    #[cfg(test)]
    pub fn shares_queue_with(&self, other: &LocalSettler) -> bool {
        self.queue.same_queue(&other.queue)
    }

    /// Whether this settler is the one a configuration asks for (same node, same key).
    pub fn serves(&self, rpc_url: &Uri, settler: Address) -> bool {
        self.rpc_url == *rpc_url && self.settler == settler
    }

    /// Readiness: the node answers and is on the configured chain, and batches have a contract to go through
    /// (a call to an address without code "succeeds" and moves nothing).
    pub async fn probe(&self) -> Result<(), String> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.provider.get_chain_id()).await {
            Err(_) => return Err("the RPC did not answer in time".into()),
            Ok(Err(_)) => return Err("the RPC is unreachable".into()),
            Ok(Ok(id)) if id != self.chain_id => {
                return Err(format!("the RPC is on chain {id}, not {}", self.chain_id))
            }
            Ok(Ok(_)) => {}
        }
        let Some(batching) = self.batching else { return Ok(()) };
        match tokio::time::timeout(PROBE_TIMEOUT, self.provider.get_code_at(batching.multicall)).await {
            Ok(Ok(code)) if code.is_empty() => Err(format!(
                "no contract at the multicall address {}: batched settlements cannot go out",
                batching.multicall
            )),
            Ok(Ok(_)) => Ok(()),
            _ => Err("the RPC did not say whether the multicall contract exists".into()),
        }
    }

    /// Simulates the settlement; one that would fail is diagnosed from the token's records.
    pub async fn verify(&self, token: Address, auth: &VerifiedAuthorization) -> Result<(), VerifyFailure> {
        let input = chain::transfer_calldata(auth);
        let would_succeed = match &self.simulations {
            Some(shared) => shared.would_succeed(token, input).await,
            None => chain::would_succeed(&self.provider, self.settler, token, input).await.map_err(|e| e.to_string()),
        };
        let failure = match would_succeed {
            Ok(true) => return Ok(()),
            Ok(false) => chain::diagnose(&self.provider, token, auth).await.map_err(|err| err.to_string()),
            Err(err) => Err(err),
        };
        match failure {
            Ok(SimulationFailure::NonceUsed) => Err(VerifyFailure::Rejected(Rejection::Replayed)),
            Ok(SimulationFailure::InsufficientBalance) => Err(VerifyFailure::Rejected(Rejection::InsufficientBalance)),
            Ok(SimulationFailure::Other) => Err(VerifyFailure::Rejected(Rejection::SimulationFailed)),
            Err(err) => {
                tracing::warn!(error = %err, "chain RPC failed during verification");
                Err(VerifyFailure::Unavailable("the chain RPC did not answer".into()))
            }
        }
    }

    pub async fn settle(
        &self,
        token: Address,
        auth: &VerifiedAuthorization,
        before: Option<BeforeBroadcast>,
    ) -> Result<Settled, SettleFailure> {
        if receipt_deadline(auth) < Duration::from_secs(x402_proto::exact_evm::SETTLE_MARGIN_SECS) {
            // Too late to land: broadcasting would only burn the settler's gas on a revert.
            let message = "the authorization expired before it could be settled".to_string();
            return Err(SettleFailure::nothing_moved(
                "invalid_exact_evm_payload_authorization_valid_before",
                message,
                None,
            ));
        }
        let sending = self.queue.send(token, chain::transfer_calldata(auth), self.batching, before);
        let not_sent = "invalid_exact_evm_transaction_failed";
        let (hash, receipt) = self.sent_and_mined(sending, not_sent, receipt_deadline(auth)).await?;
        if chain::used_authorization(&receipt, token, auth.from, auth.nonce) {
            return Ok(Settled::exact(hash.to_string()));
        }
        // Not by this transaction: the call reverted (alone, or inside a batch), or someone else used the
        // authorization first. The token's own record decides.
        let used = chain::view(
            &self.provider,
            token,
            chain::Eip3009Token::authorizationStateCall { authorizer: auth.from, nonce: auth.nonce },
        )
        .await;
        match used {
            Ok(false) => Err(SettleFailure::nothing_moved(
                "invalid_exact_evm_transaction_failed",
                "the settlement transaction did not transfer this payment".into(),
                Some(hash.to_string()),
            )),
            // Moved, by another transaction (or the node could not say): reconciliation finds which.
            _ => Err(SettleFailure::pending(hash.to_string())),
        }
    }
}

impl LocalSettler {
    /// The settlement transaction `sending` hands to the queue, once mined (waiting at most `deadline`, and
    /// the settle timeout). Not sent: `not_sent`, nothing moved. Not seen mined: pending.
    pub(super) async fn sent_and_mined(
        &self,
        sending: impl std::future::Future<Output = Result<Sent, SendError>>,
        not_sent: &str,
        deadline: Duration,
    ) -> Result<(B256, Arc<TransactionReceipt>), SettleFailure> {
        let (hash, in_flight) = match sending.await {
            Ok(sent) => (sent.hash, Some(sent.in_flight)),
            Err(SendError::Refused(detail)) => {
                // The node's or the ledger's words are the operator's business, not the buyer's.
                tracing::warn!(detail = %detail, "the settlement transaction was not sent");
                let message = "the settlement transaction could not be sent; nothing was charged".to_string();
                return Err(SettleFailure::nothing_moved(not_sent, message, None));
            }
            Err(SendError::Unknown(hash)) => (hash, None),
        };
        let receipt = self.receipts.wait(hash, deadline.min(self.receipt_timeout)).await;
        // Seen (or given up on): the payments batching behind this transaction may go.
        drop(in_flight);
        match receipt {
            Some(receipt) => Ok((hash, receipt)),
            None => {
                // It may have been dropped, leaving a gap in the account's nonces: let the queue ask the chain.
                self.queue.resync();
                Err(SettleFailure::pending(hash.to_string()))
            }
        }
    }
}

/// Wait no longer than the authorization is valid: after `validBefore` the transaction cannot succeed.
fn receipt_deadline(auth: &VerifiedAuthorization) -> Duration {
    Duration::from_secs(auth.valid_before_secs().saturating_sub(x402_proto::unix_now()))
}
