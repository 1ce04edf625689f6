//! Reconciliation: rows left open by a crash or a settlement timeout are resolved against the chain.
//! The chain's word is final: for `exact`, `authorizationState(payer, nonce)` says whether the money moved; for
//! `upto`, the settlement transaction's receipt, else Permit2's record of the buyer's nonce (`nonceBitmap`).

use super::{LedgerError, PaymentStore, Row, State};
use crate::chain::{self, Eip3009Token};
use crate::settlement;
use alloy::consensus::Transaction as _;
use alloy::primitives::{keccak256, Address, B256, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::Filter;
use alloy::sol;
use std::collections::HashMap;
use std::num::NonZeroU64;
use x402_proto::upto_evm::{PERMIT2, UPTO_PROXY};

sol! {
    /// Permit2's unordered nonces (`SignatureTransfer`): bit `nonce & 0xff` of word `nonce >> 8` of the owner's
    /// bitmap is set once a signature with that nonce was used (or the owner invalidated it).
    interface Permit2Nonces {
        function nonceBitmap(address owner, uint256 wordPos) external view returns (uint256);
    }
}

/// The transaction recorded for a row whose payment the chain shows moved, when no receipt or event names it
/// (Permit2 logs no event of its own for a nonce it spends).
const UNKNOWN_TRANSACTION: &str = "unknown";

pub const NEVER_SERVED: &str = "settled, but the paid answer was never delivered";
/// How far back to look for the transfer event of an authorization whose transaction hash was not recorded.
const EVENT_LOOKBACK_BLOCKS: u64 = 50_000;
/// A failed settlement's authorization may be landed by anyone who saw it until it expires: its row is watched
/// that long, and this much longer, so at least one check falls after the expiry.
const LATE_LANDING_WATCH_SECS: u64 = 3600;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reconciled {
    pub settled: u64,
    pub failed: u64,
    pub released: u64,
    pub still_pending: u64,
    /// Paid but not served: marked `refund_needed` and reported.
    pub refunds: u64,
    /// Rows on a network the configuration has no RPC for, or whose RPC did not answer.
    pub unreachable: u64,
}

/// Resolves `settling` rows last touched before `settling_cutoff` against the chain (their settlement had time
/// to land), and rows last touched before `cutoff` (unix seconds; the request that held them is over): `verified`
/// (never broadcast) to `released`, and `settled` but never served to `refund_needed`. Event searches go
/// `log_chunk_blocks` at a time. A row whose node fails to answer is left as it is, for the next pass.
pub async fn reconcile(
    ledger: &dyn PaymentStore,
    chains: &HashMap<u64, RootProvider>,
    log_chunk_blocks: NonZeroU64,
    settling_cutoff: u64,
    cutoff: u64,
) -> Result<Reconciled, LedgerError> {
    let mut report = Reconciled::default();
    let now = crate::replay::unix_now();
    for row in ledger.in_state(State::Settling).await?.into_iter().filter(|r| r.updated_at < settling_cutoff) {
        let Some(provider) = chains.get(&row.chain_id) else {
            report.unreachable += 1;
            continue;
        };
        match on_chain(provider, &row, log_chunk_blocks).await {
            Err(err) => {
                // The error is the node's or the transport's, which never names the RPC URL (it may hold a key).
                tracing::warn!(id = row.id, chain_id = row.chain_id, error = %err, "reconciliation could not reach the chain; the row is left for the next pass");
                report.unreachable += 1;
            }
            Ok(Outcome::Moved(transaction)) => {
                moved(ledger.settled(row.id, transaction.clone()).await)?;
                report.settled += 1;
                if !row.served {
                    moved(ledger.refund_needed(row.id, NEVER_SERVED.into()).await)?;
                    report.refunds += 1;
                    tracing::warn!(id = row.id, payer = %row.payer, amount = %row.amount, %transaction, "payment settled but never served: refund needed");
                }
            }
            Ok(Outcome::MinedUnused) => {
                let reason = "the settlement transaction did not transfer this payment";
                moved(ledger.failed(row.id, reason.into(), row.transaction.clone()).await)?;
                report.failed += 1;
            }
            Ok(Outcome::Lost) => {
                moved(
                    ledger
                        .failed(
                            row.id,
                            "the settlement was never broadcast, or was dropped".into(),
                            row.transaction.clone(),
                        )
                        .await,
                )?;
                report.failed += 1;
            }
            Ok(Outcome::Cancelled) => {
                let reason = "the buyer cancelled its Permit2 nonce before the payment settled: nothing moved";
                moved(ledger.failed(row.id, reason.into(), row.transaction.clone()).await)?;
                report.failed += 1;
                tracing::warn!(id = row.id, payer = %row.payer, amount = %row.charge(), "{reason}");
            }
            Ok(Outcome::NotYet) if now >= row.valid_before => {
                moved(
                    ledger.failed(row.id, "the authorization expired unsettled".into(), row.transaction.clone()).await,
                )?;
                report.failed += 1;
            }
            Ok(Outcome::NotYet) => report.still_pending += 1,
        }
    }
    let watched = ledger.failed_valid_since(now.saturating_sub(LATE_LANDING_WATCH_SECS)).await?;
    for row in watched.into_iter().filter(|r| r.updated_at < cutoff) {
        let Some(provider) = chains.get(&row.chain_id) else { continue };
        match landed(provider, &row, log_chunk_blocks).await {
            Ok(Some(transaction)) => {
                moved(ledger.landed_late(row.id, transaction.clone()).await)?;
                report.refunds += 1;
                tracing::warn!(id = row.id, payer = %row.payer, amount = %row.charge(), %transaction, "a payment recorded as failed was settled by someone else: refund needed");
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(id = row.id, chain_id = row.chain_id, error = %err, "reconciliation could not reach the chain; the row is left for the next pass")
            }
        }
    }
    // An `upto` row stays `verified` while its answer streams, which may outlast the grace: it is left alone
    // until its permit has lapsed, when it can no longer be settled by anyone.
    let now = crate::replay::unix_now();
    let done = |r: &Row| r.updated_at < cutoff && !(r.scheme == "upto" && r.valid_before > now);
    for row in ledger.in_state(State::Verified).await?.into_iter().filter(done) {
        moved(ledger.released(row.id, row.upstream_status).await)?;
        report.released += 1;
    }
    for row in ledger.in_state(State::Settled).await?.into_iter().filter(|r| !r.served && r.updated_at < cutoff) {
        moved(ledger.refund_needed(row.id, NEVER_SERVED.into()).await)?;
        report.refunds += 1;
        tracing::warn!(id = row.id, payer = %row.payer, amount = %row.charge(), "payment settled but never served: refund needed");
    }
    Ok(report)
}

/// A row that moved underneath (its request finished meanwhile) needs nothing more from reconciliation.
fn moved(written: Result<(), LedgerError>) -> Result<(), LedgerError> {
    match written {
        Err(LedgerError::Conflict(_)) => Ok(()),
        other => other,
    }
}

enum Outcome {
    /// The authorization was used: the transfer happened, in this transaction.
    Moved(String),
    /// Mined without using the authorization (reverted, or its call failed inside a batch).
    MinedUnused,
    /// Not on chain, not in the node's pool, and no one left to send it: it will not happen.
    Lost,
    /// The buyer spent its own permit's nonce (Permit2's `invalidateUnorderedNonces`): nothing can move now.
    Cancelled,
    NotYet,
}

async fn on_chain(provider: &RootProvider, row: &Row, log_chunk_blocks: NonZeroU64) -> Result<Outcome, String> {
    if row.scheme == "upto" {
        return upto_on_chain(provider, row, log_chunk_blocks).await;
    }
    let (token, payer, nonce) = (row.asset, row.payer, row.nonce);
    let known: Option<B256> = row.transaction.as_deref().and_then(|t| t.parse().ok());
    // The receipt first: a transaction mined before `authorizationState` is read is seen using it there.
    let receipt = match known {
        Some(hash) => provider.get_transaction_receipt(hash).await.map_err(|e| e.to_string())?,
        None => None,
    };
    let used = chain::view(provider, token, Eip3009Token::authorizationStateCall { authorizer: payer, nonce })
        .await
        .map_err(|e| e.to_string())?;
    if used {
        let transaction = match (known, &receipt) {
            (Some(hash), Some(r)) if chain::used_authorization(r, token, payer, nonce) => hash.to_string(),
            _ => transaction_of(provider, row, (token, payer, nonce), log_chunk_blocks).await?,
        };
        return Ok(Outcome::Moved(transaction));
    }
    if receipt.is_some() {
        return Ok(Outcome::MinedUnused);
    }
    // The hash is recorded before each broadcast, so a local settlement without one was never sent. A remote
    // facilitator may be sending it still: only the authorization's expiry closes that row.
    Ok(match known {
        Some(hash) => match provider.get_transaction_by_hash(hash).await.map_err(|e| e.to_string())? {
            Some(_) => Outcome::NotYet,
            None => Outcome::Lost,
        },
        None if row.facilitator == "local" => Outcome::Lost,
        None => Outcome::NotYet,
    })
}

/// An `upto` row, decided by Permit2's record of its nonce (`nonceBitmap`), read after the receipt as for
/// `exact`. Spent: settled, by the recorded transaction if it succeeded (a success alone proves nothing: a call
/// to an address without code succeeds too), else by the proxy settlement the token's `Transfer` events lead
/// to; with none, the buyer may have spent the nonce itself (`invalidateUnorderedNonces`), which moves nothing.
/// Unspent: nothing moved if the recorded transaction was mined; otherwise it waits for the permit's deadline,
/// after which Permit2 refuses it (the caller then marks it failed).
async fn upto_on_chain(provider: &RootProvider, row: &Row, log_chunk_blocks: NonZeroU64) -> Result<Outcome, String> {
    let known: Option<B256> = row.transaction.as_deref().and_then(|t| t.parse().ok());
    let receipt = match known {
        Some(hash) => provider.get_transaction_receipt(hash).await.map_err(|e| e.to_string())?,
        None => None,
    };
    let used = permit2_nonce_used(provider, row).await?;
    Ok(match (used, known, &receipt) {
        (true, Some(hash), Some(receipt)) if receipt.status() => Outcome::Moved(hash.to_string()),
        (true, _, _) => match upto_settlement(provider, row, log_chunk_blocks).await? {
            Some(transaction) => Outcome::Moved(transaction),
            None if nonce_invalidated(provider, row, log_chunk_blocks).await? => Outcome::Cancelled,
            None => {
                tracing::warn!(
                    id = row.id,
                    payer = %row.payer,
                    "Permit2 shows the payment's nonce spent, and neither its settlement nor the buyer's cancelling is in the last {EVENT_LOOKBACK_BLOCKS} blocks: recorded with transaction `{UNKNOWN_TRANSACTION}`"
                );
                Outcome::Moved(UNKNOWN_TRANSACTION.into())
            }
        },
        (false, _, Some(_)) => Outcome::MinedUnused,
        (false, _, None) => Outcome::NotYet,
    })
}

/// The transaction that settled an `upto` row's permit: among those that moved the token from its payer to
/// its payee (newest first), the one that called the proxy with this permit's nonce.
async fn upto_settlement(
    provider: &RootProvider,
    row: &Row,
    log_chunk_blocks: NonZeroU64,
) -> Result<Option<String>, String> {
    let transfers = Filter::new()
        .address(row.asset)
        .event_signature(keccak256("Transfer(address,address,uint256)"))
        .topic1(row.payer.into_word())
        .topic2(row.payee.into_word());
    let nonce = U256::from_be_bytes(row.nonce.0);
    let mut seen = std::collections::HashSet::new();
    for (from, to) in lookback(provider, log_chunk_blocks).await? {
        let chunk = transfers.clone().from_block(from).to_block(to);
        let logs = provider.get_logs(&chunk).await.map_err(|e| format!("eth_getLogs of blocks {from} to {to}: {e}"))?;
        for hash in logs.iter().rev().filter_map(|log| log.transaction_hash) {
            if !seen.insert(hash) {
                continue;
            }
            let transaction =
                provider.get_transaction_by_hash(hash).await.map_err(|e| format!("eth_getTransactionByHash: {e}"))?;
            let settles = transaction
                .is_some_and(|t| t.to() == Some(UPTO_PROXY) && settlement::settles_permit(t.input(), row.payer, nonce));
            if settles {
                return Ok(Some(hash.to_string()));
            }
        }
    }
    Ok(None)
}

/// Whether the buyer spent the row's permit nonce itself: a Permit2 `UnorderedNonceInvalidation` of its
/// own whose mask covers the nonce's bit.
async fn nonce_invalidated(provider: &RootProvider, row: &Row, log_chunk_blocks: NonZeroU64) -> Result<bool, String> {
    let nonce = U256::from_be_bytes(row.nonce.0);
    let (word, bit) = (nonce >> 8, U256::from(1) << (nonce & U256::from(0xff)).to::<usize>());
    let invalidations = Filter::new()
        .address(PERMIT2)
        .event_signature(keccak256("UnorderedNonceInvalidation(address,uint256,uint256)"))
        .topic1(row.payer.into_word());
    for (from, to) in lookback(provider, log_chunk_blocks).await? {
        let chunk = invalidations.clone().from_block(from).to_block(to);
        let logs = provider.get_logs(&chunk).await.map_err(|e| format!("eth_getLogs of blocks {from} to {to}: {e}"))?;
        let covers = |data: &[u8]| {
            let (Some(logged_word), Some(mask)) = (data.get(..32), data.get(32..64)) else { return false };
            U256::from_be_slice(logged_word) == word && !(U256::from_be_slice(mask) & bit).is_zero()
        };
        if logs.iter().any(|log| covers(&log.data().data)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether Permit2 has spent the row's nonce for its payer.
async fn permit2_nonce_used(provider: &RootProvider, row: &Row) -> Result<bool, String> {
    let nonce = U256::from_be_bytes(row.nonce.0);
    let call = Permit2Nonces::nonceBitmapCall { owner: row.payer, wordPos: nonce >> 8 };
    let word = chain::view(provider, PERMIT2, call).await.map_err(|e| format!("Permit2 nonceBitmap: {e}"))?;
    Ok(word.bit((nonce & U256::from(0xff)).to::<usize>()))
}

/// Whether a failed row's authorization has been used since, and by which transaction.
async fn landed(provider: &RootProvider, row: &Row, log_chunk_blocks: NonZeroU64) -> Result<Option<String>, String> {
    if row.scheme == "upto" {
        return Ok(match upto_on_chain(provider, row, log_chunk_blocks).await? {
            Outcome::Moved(transaction) => Some(transaction),
            _ => None,
        });
    }
    let authorization = (row.asset, row.payer, row.nonce);
    let (token, payer, nonce) = authorization;
    let used = chain::view(provider, token, Eip3009Token::authorizationStateCall { authorizer: payer, nonce })
        .await
        .map_err(|e| e.to_string())?;
    if !used {
        return Ok(None);
    }
    transaction_of(provider, row, authorization, log_chunk_blocks).await.map(Some)
}

/// The transaction that used an authorization the chain says is used, from its `AuthorizationUsed` event;
/// `unknown` (and a warning) when no event is within reach. `Err` when the node did not answer.
async fn transaction_of(
    provider: &RootProvider,
    row: &Row,
    (token, payer, nonce): (Address, Address, B256),
    log_chunk_blocks: NonZeroU64,
) -> Result<String, String> {
    match transfer_event(provider, token, payer, nonce, log_chunk_blocks).await? {
        Some(transaction) => Ok(transaction),
        None => {
            tracing::warn!(
                id = row.id,
                payer = %row.payer,
                "the authorization was used, but no AuthorizationUsed event is in the last {EVENT_LOOKBACK_BLOCKS} blocks: recorded with transaction `{UNKNOWN_TRANSACTION}`"
            );
            Ok(UNKNOWN_TRANSACTION.into())
        }
    }
}

/// The transaction that used `(payer, nonce)`, from the token's `AuthorizationUsed` event in the last
/// `EVENT_LOOKBACK_BLOCKS`, newest first and `log_chunk_blocks` per query (providers cap a query's range).
async fn transfer_event(
    provider: &RootProvider,
    token: Address,
    payer: Address,
    nonce: B256,
    log_chunk_blocks: NonZeroU64,
) -> Result<Option<String>, String> {
    let filter = Filter::new()
        .address(token)
        .event_signature(keccak256("AuthorizationUsed(address,bytes32)"))
        .topic1(payer.into_word())
        .topic2(nonce);
    for (from, to) in lookback(provider, log_chunk_blocks).await? {
        let chunk = filter.clone().from_block(from).to_block(to);
        let logs = provider.get_logs(&chunk).await.map_err(|e| format!("eth_getLogs of blocks {from} to {to}: {e}"))?;
        if let Some(hash) = logs.iter().find_map(|log| log.transaction_hash) {
            return Ok(Some(hash.to_string()));
        }
    }
    Ok(None)
}

/// The block ranges of the last `EVENT_LOOKBACK_BLOCKS`, newest first, `log_chunk_blocks` each (providers cap
/// a query's range).
async fn lookback(provider: &RootProvider, log_chunk_blocks: NonZeroU64) -> Result<Vec<(u64, u64)>, String> {
    let latest = provider.get_block_number().await.map_err(|e| format!("eth_blockNumber: {e}"))?;
    let oldest = latest.saturating_sub(EVENT_LOOKBACK_BLOCKS);
    let mut ranges = Vec::new();
    let mut to = latest;
    loop {
        let from = to.saturating_sub(log_chunk_blocks.get() - 1).max(oldest);
        ranges.push((from, to));
        if from == oldest {
            return Ok(ranges);
        }
        to = from - 1;
    }
}
