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

/// The transaction recorded for an `exact` row whose authorization the chain shows used, when no receipt or
/// event within reach names it.
const UNKNOWN_TRANSACTION: &str = "unknown";

pub const NEVER_SERVED: &str = "settled, but the paid answer was never delivered";
/// How far back to look for the transfer event of an authorization whose transaction hash was not recorded.
const EVENT_LOOKBACK_BLOCKS: u64 = 50_000;
/// Transactions looked at, at most, for the one that settled an `upto` row: those that moved the token from
/// its payer to its payee, which a buyer could multiply.
const SETTLEMENT_CANDIDATES: usize = 16;
/// Why an `upto` row whose nonce was spent, with no settlement of its charge to be found, is failed.
pub const SPENT_UNPAID: &str =
    "the permit's nonce was spent, but no settlement of it to the payee was found: not counted as paid";
/// Why an `upto` row whose permit was settled for another amount than its charge is failed (the buyer can
/// sign another permit of the same nonce, naming any facilitator).
pub const OTHER_TERMS: &str = "the permit's nonce was settled for another amount than the charge";
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
            Ok(Outcome::SpentUnpaid) => {
                moved(ledger.failed(row.id, SPENT_UNPAID.into(), row.transaction.clone()).await)?;
                report.failed += 1;
                tracing::warn!(id = row.id, payer = %row.payer, amount = %row.charge(), "{SPENT_UNPAID}");
            }
            Ok(Outcome::OtherTerms(transaction, amount)) => {
                let reason = format!("{OTHER_TERMS}: {amount} in {transaction}");
                moved(ledger.failed(row.id, reason.clone(), row.transaction.clone()).await)?;
                report.failed += 1;
                tracing::warn!(id = row.id, payer = %row.payer, charge = %row.charge(), "{reason}");
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
            // An answer that went out before it settled (a stream): paid for after all, nothing to refund.
            Ok(Some((transaction, true))) if row.served => {
                moved(ledger.settled_late(row.id, transaction.clone()).await)?;
                report.settled += 1;
                tracing::warn!(id = row.id, payer = %row.payer, amount = %row.charge(), %transaction, "a delivered payment recorded as failed was settled after all");
            }
            // Settled for another amount than charged, its answer out: not counted as paid, nor owed back.
            Ok(Some((transaction, false))) if row.served => {
                tracing::debug!(id = row.id, %transaction, "a delivered payment recorded as failed was settled on other terms")
            }
            Ok(Some((transaction, _))) => {
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
    /// An `upto` permit's nonce spent by no settlement to the payee to be found: by the buyer itself
    /// (cancelled, or paid elsewhere), or too long ago to tell. Nothing can move for it now.
    SpentUnpaid,
    /// An `upto` permit settled to the payee by this transaction, for this amount, which is not the charge.
    OtherTerms(String, U256),
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
/// `exact`. Spent: settled by the recorded transaction if it succeeded (a success alone proves nothing: a call
/// to an address without code succeeds too), else by a proxy settlement on the row's own terms that the
/// token's `Transfer` events lead to. A nonce spent otherwise (the buyer can name any facilitator in a permit of
/// the same nonce, or cancel it) was not paid as charged. Unspent: nothing moved if the recorded transaction
/// was mined; otherwise it waits for the permit's deadline, after which Permit2 refuses it (the caller then
/// marks it failed).
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
            Some((transaction, amount)) if amount == row.charge() => Outcome::Moved(transaction),
            Some((transaction, amount)) => Outcome::OtherTerms(transaction, amount),
            None => Outcome::SpentUnpaid,
        },
        (false, _, Some(_)) => Outcome::MinedUnused,
        (false, _, None) => Outcome::NotYet,
    })
}

/// The transaction that settled an `upto` row's permit, and the amount it settled: among those that moved the
/// token from its payer to its payee (newest first, `SETTLEMENT_CANDIDATES` at most), one that called the
/// proxy on the row's permit, token and payee.
async fn upto_settlement(
    provider: &RootProvider,
    row: &Row,
    log_chunk_blocks: NonZeroU64,
) -> Result<Option<(String, U256)>, String> {
    let terms = settlement::UptoTerms {
        owner: row.payer,
        nonce: U256::from_be_bytes(row.nonce.0),
        token: row.asset,
        pay_to: row.payee,
    };
    let transfers = Filter::new()
        .address(row.asset)
        .event_signature(keccak256("Transfer(address,address,uint256)"))
        .topic1(row.payer.into_word())
        .topic2(row.payee.into_word());
    let mut seen = std::collections::HashSet::new();
    for (from, to) in lookback(provider, log_chunk_blocks).await? {
        let chunk = transfers.clone().from_block(from).to_block(to);
        let logs = provider.get_logs(&chunk).await.map_err(|e| format!("eth_getLogs of blocks {from} to {to}: {e}"))?;
        for hash in logs.iter().rev().filter_map(|log| log.transaction_hash) {
            if !seen.insert(hash) {
                continue;
            }
            if seen.len() > SETTLEMENT_CANDIDATES {
                return Ok(None);
            }
            let transaction =
                provider.get_transaction_by_hash(hash).await.map_err(|e| format!("eth_getTransactionByHash: {e}"))?;
            let settled = transaction
                .filter(|t| t.to() == Some(UPTO_PROXY))
                .and_then(|t| settlement::settled_amount(t.input(), &terms));
            if let Some(amount) = settled {
                return Ok(Some((hash.to_string(), amount)));
            }
        }
    }
    Ok(None)
}

/// Whether Permit2 has spent the row's nonce for its payer.
async fn permit2_nonce_used(provider: &RootProvider, row: &Row) -> Result<bool, String> {
    let nonce = U256::from_be_bytes(row.nonce.0);
    let call = Permit2Nonces::nonceBitmapCall { owner: row.payer, wordPos: nonce >> 8 };
    let word = chain::view(provider, PERMIT2, call).await.map_err(|e| format!("Permit2 nonceBitmap: {e}"))?;
    Ok(word.bit((nonce & U256::from(0xff)).to::<usize>()))
}

/// Whether a failed row's authorization has been used since, and by which transaction.
/// Also whether it moved the charge as recorded (or, for `upto`, another amount).
async fn landed(
    provider: &RootProvider,
    row: &Row,
    log_chunk_blocks: NonZeroU64,
) -> Result<Option<(String, bool)>, String> {
    if row.scheme == "upto" {
        // Its nonce was spent already when it failed: nothing can land for it any more.
        if row.failure.as_deref().is_some_and(|f| f == SPENT_UNPAID || f.starts_with(OTHER_TERMS)) {
            return Ok(None);
        }
        return Ok(match upto_on_chain(provider, row, log_chunk_blocks).await? {
            Outcome::Moved(transaction) => Some((transaction, true)),
            Outcome::OtherTerms(transaction, _) => Some((transaction, false)),
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
    transaction_of(provider, row, authorization, log_chunk_blocks).await.map(|transaction| Some((transaction, true)))
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
