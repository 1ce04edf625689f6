//! The in-process facilitator: simulates each authorization on chain before the request goes upstream, and
//! settles it with the gateway's own gas-paying key.

use super::queue::{BeforeBroadcast, SendError, TxQueue};
use super::{SettleFailure, Settled, VerifyFailure};
use crate::chain::{self, SimulationFailure};
use crate::x402::exact_evm::VerifiedAuthorization;
use crate::x402::Rejection;
use alloy::primitives::{Address, B256};
use alloy::providers::{Provider, RootProvider};
use alloy::signers::local::PrivateKeySigner;
use http::Uri;
use std::time::Duration;

const FIRST_POLL: Duration = Duration::from_millis(20);
const LONGEST_POLL: Duration = Duration::from_millis(500);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct LocalSettler {
    provider: RootProvider,
    rpc_url: Uri,
    settler: Address,
    chain_id: u64,
    queue: TxQueue,
    receipt_timeout: Duration,
}

impl LocalSettler {
    pub fn new(
        provider: RootProvider,
        rpc_url: Uri,
        signer: PrivateKeySigner,
        chain_id: u64,
        receipt_timeout: Duration,
    ) -> LocalSettler {
        let settler = signer.address();
        let queue = TxQueue::spawn(provider.clone(), signer, chain_id);
        LocalSettler { provider, rpc_url, settler, chain_id, queue, receipt_timeout }
    }

    /// Whether this settler is the one a configuration asks for (same node, same key).
    pub fn serves(&self, rpc_url: &Uri, settler: Address) -> bool {
        self.rpc_url == *rpc_url && self.settler == settler
    }

    /// Readiness: the node answers and is on the configured chain.
    pub async fn probe(&self) -> Result<(), String> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.provider.get_chain_id()).await {
            Err(_) => Err("the RPC did not answer in time".into()),
            Ok(Err(_)) => Err("the RPC is unreachable".into()),
            Ok(Ok(id)) if id != self.chain_id => Err(format!("the RPC is on chain {id}, not {}", self.chain_id)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    pub async fn verify(&self, token: Address, auth: &VerifiedAuthorization) -> Result<(), VerifyFailure> {
        match chain::simulate_transfer(&self.provider, token, self.settler, auth).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(SimulationFailure::NonceUsed)) => Err(VerifyFailure::Rejected(Rejection::Replayed)),
            Ok(Err(SimulationFailure::InsufficientBalance)) => {
                Err(VerifyFailure::Rejected(Rejection::InsufficientBalance))
            }
            Ok(Err(SimulationFailure::Other)) => Err(VerifyFailure::Rejected(Rejection::SimulationFailed)),
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
        if receipt_deadline(auth) < Duration::from_secs(crate::x402::exact_evm::SETTLE_MARGIN_SECS) {
            // Too late to land: broadcasting would only burn the settler's gas on a revert.
            let message = "the authorization expired before it could be settled".to_string();
            return Err(SettleFailure::nothing_moved(
                "invalid_exact_evm_payload_authorization_valid_before",
                message,
                None,
            ));
        }
        let hash = match self.queue.send(token, chain::transfer_calldata(auth), before).await {
            Ok(hash) => hash,
            Err(SendError::Refused(detail)) => {
                // The node's or the ledger's words are the operator's business, not the buyer's.
                tracing::warn!(detail = %detail, "the settlement transaction was not sent");
                let message = "the settlement transaction could not be sent; nothing was charged".to_string();
                return Err(SettleFailure::nothing_moved("invalid_exact_evm_transaction_failed", message, None));
            }
            Err(SendError::Unknown(hash)) => hash,
        };
        match self.wait_for_receipt(hash, receipt_deadline(auth).min(self.receipt_timeout)).await {
            Some(true) => Ok(Settled { transaction: hash.to_string() }),
            Some(false) => Err(SettleFailure::nothing_moved(
                "invalid_exact_evm_transaction_failed",
                "the settlement transaction reverted".into(),
                Some(hash.to_string()),
            )),
            None => {
                // It may have been dropped, leaving a gap in the account's nonces: let the queue ask the chain.
                self.queue.resync();
                Err(SettleFailure::pending(hash.to_string()))
            }
        }
    }

    /// `Some(succeeded)` once the receipt is in, `None` if the deadline passes first.
    async fn wait_for_receipt(&self, hash: B256, timeout: Duration) -> Option<bool> {
        let started = tokio::time::Instant::now();
        let mut pause = FIRST_POLL;
        while started.elapsed() < timeout {
            match self.provider.get_transaction_receipt(hash).await {
                Ok(Some(receipt)) => return Some(receipt.status()),
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, transaction = %hash, "polling for a settlement receipt failed")
                }
            }
            tokio::time::sleep(pause.min(timeout.saturating_sub(started.elapsed()))).await;
            pause = (pause * 2).min(LONGEST_POLL);
        }
        None
    }
}

/// Wait no longer than the authorization is valid: after `validBefore` the transaction cannot succeed.
fn receipt_deadline(auth: &VerifiedAuthorization) -> Duration {
    Duration::from_secs(auth.valid_before_secs().saturating_sub(crate::replay::unix_now()))
}
