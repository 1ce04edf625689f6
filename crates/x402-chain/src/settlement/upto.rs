//! The `upto` scheme settled in-process: a Permit2 `PermitWitnessTransferFrom` of a ceiling, settled for the
//! actual amount through the `x402UptoPermit2Proxy` (`settle`, or `settleWithPermit` with the buyer's EIP-2612
//! permit when Permit2 has no allowance yet). The proxy lets only the facilitator the witness names call it, so
//! these transactions go out one each from the settler's key, never in a Multicall batch.

use super::local::LocalSettler;
use super::queue::BeforeBroadcast;
use super::{SettleFailure, Settled, VerifyFailure};
use crate::chain;
use alloy::eips::BlockId;
use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::sol;
use alloy::sol_types::{Revert, SolCall, SolError, SolEvent, SolInterface};
use alloy::transports::TransportError;
use std::sync::atomic::Ordering;
use std::time::Duration;
use x402_proto::upto_evm::{Eip2612Permit, PermitAuthorization, PERMIT2, UPTO_PROXY};
use x402_proto::Rejection;

sol! {
    /// `x402UptoPermit2Proxy` (contracts/x402UptoPermit2Proxy.sol), as `@x402/evm` ships its ABI.
    interface UptoProxy {
        struct TokenPermissions {
            address token;
            uint256 amount;
        }
        struct PermitTransferFrom {
            TokenPermissions permitted;
            uint256 nonce;
            uint256 deadline;
        }
        struct Witness {
            address to;
            address facilitator;
            uint256 validAfter;
        }
        struct EIP2612Permit {
            uint256 value;
            uint256 deadline;
            bytes32 r;
            bytes32 s;
            uint8 v;
        }
        function settle(PermitTransferFrom permit, uint256 amount, address owner, Witness witness, bytes signature) external;
        function settleWithPermit(EIP2612Permit permit2612, PermitTransferFrom permit, uint256 amount, address owner, Witness witness, bytes signature) external;
        event Settled();
        event SettledWithPermit();
        error AmountExceedsPermitted();
        error UnauthorizedFacilitator();
        error InvalidAmount();
        error InvalidOwner();
        error InvalidDestination();
        error PaymentTooEarly();
        error Permit2612AmountMismatch();
        error ReentrancyGuardReentrantCall();
    }

    /// The parts of Uniswap's Permit2 the settler reads, and the errors its signature transfers revert with.
    interface Permit2 {
        function nonceBitmap(address owner, uint256 wordPosition) external view returns (uint256);
        error InvalidNonce();
        error SignatureExpired(uint256 signatureDeadline);
        error InvalidAmount(uint256 maxAmount);
        error InvalidSignature();
        error InvalidSigner();
        error InvalidSignatureLength();
        error InvalidContractSignature();
    }

    interface Erc20Allowance {
        function allowance(address owner, address spender) external view returns (uint256);
    }
}

/// One `upto` payment as recorded: its owner's permit nonce, settled in `token` to `pay_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UptoTerms {
    pub owner: Address,
    pub nonce: U256,
    pub token: Address,
    pub pay_to: Address,
}

/// The amount that `input` (a transaction's calldata) settles, if it is the proxy's `settle` or
/// `settleWithPermit` of this owner's permit nonce, in this token, to this payee. Anyone the buyer names as
/// facilitator can settle a permit of its nonce, for any amount: the amount says whether it paid the charge.
pub fn settled_amount(input: &[u8], terms: &UptoTerms) -> Option<U256> {
    let (permit, amount, owner, witness) = match UptoProxy::UptoProxyCalls::abi_decode(input).ok()? {
        UptoProxy::UptoProxyCalls::settle(call) => (call.permit, call.amount, call.owner, call.witness),
        UptoProxy::UptoProxyCalls::settleWithPermit(call) => (call.permit, call.amount, call.owner, call.witness),
    };
    let ours = owner == terms.owner
        && permit.nonce == terms.nonce
        && permit.permitted.token == terms.token
        && witness.to == terms.pay_to;
    ours.then_some(amount)
}

/// A settlement's `eth_call`: `Ok` if it would succeed, else the revert data the node returned, if any.
type Simulated = Result<(), Option<Bytes>>;

impl LocalSettler {
    /// The on-chain half of verifying an `upto` payment whose signature and fields passed the offline checks: the
    /// witness names this settler, the buyer holds the ceiling and has approved Permit2 for it (or sent an
    /// EIP-2612 permit that will), and settling the full ceiling would succeed now.
    pub async fn verify_upto(&self, auth: &PermitAuthorization) -> Result<(), VerifyFailure> {
        if auth.facilitator != self.settler {
            return Err(VerifyFailure::Rejected(Rejection::UptoFacilitator));
        }
        // With a permit, `settleWithPermit` is simulated whatever the allowance: it succeeds whenever `settle`
        // would (the proxy goes on past a refused permit), so the simulation need not wait for the allowance and
        // everything is asked in one round trip.
        let input = settle_calldata(auth, auth.ceiling, auth.eip2612.as_ref());
        let (proxy, balance, allowance, simulated) = tokio::join!(
            self.upto_proxy_deployed(),
            chain::balance_of(&self.provider, auth.token, auth.from),
            permit2_allowance(&self.provider, auth),
            simulate(&self.provider, self.settler, input, None),
        );
        let unavailable = |err: TransportError| {
            tracing::warn!(error = %err, "chain RPC failed during upto verification");
            VerifyFailure::Unavailable("the chain RPC did not answer".into())
        };
        if !proxy.map_err(unavailable)? {
            tracing::error!(proxy = %UPTO_PROXY, "no x402UptoPermit2Proxy on this chain: upto payments cannot settle");
            return Err(VerifyFailure::Unavailable("upto payments cannot be settled on this chain".into()));
        }
        let (balance, allowance, simulated) =
            (balance.map_err(unavailable)?, allowance.map_err(unavailable)?, simulated.map_err(unavailable)?);
        if balance < auth.ceiling {
            return Err(VerifyFailure::Rejected(Rejection::Permit2InsufficientBalance));
        }
        let approved = allowance >= auth.ceiling;
        if !approved && auth.eip2612.is_none() {
            return Err(VerifyFailure::Rejected(Rejection::Permit2AllowanceRequired));
        }
        let Err(revert) = simulated else { return Ok(()) };
        let reason = revert.as_ref().map_or("no revert data", revert_reason);
        tracing::debug!(reason, payer = %auth.from, "the upto settlement would revert");
        // Permit2 could not pull the tokens although the balance is there: the permit gave it no allowance.
        if !approved && revert.as_ref().is_some_and(is_transfer_from_failure) {
            return Err(VerifyFailure::Rejected(Rejection::Permit2AllowanceRequired));
        }
        Err(VerifyFailure::Rejected(Rejection::Permit2SimulationFailed))
    }

    /// Settles `amount` (at least 1, at most the ceiling) of a verified `upto` authorization. An actual amount of 0
    /// sends nothing: the caller settles it without calling this.
    pub async fn settle_upto(
        &self,
        auth: &PermitAuthorization,
        amount: U256,
        before: Option<BeforeBroadcast>,
    ) -> Result<Settled, SettleFailure> {
        if let Some(refusal) = self.refuse_before_sending(auth, amount) {
            return Err(refusal);
        }
        let permit = match &auth.eip2612 {
            // An allowance that cannot be read is taken as short: a permit the token refuses costs nothing more.
            Some(permit) => match permit2_allowance(&self.provider, auth).await {
                Ok(allowance) if allowance >= auth.ceiling => None,
                _ => Some(permit),
            },
            None => None,
        };
        let input = settle_calldata(auth, amount, permit);
        let sending = self.queue.send_alone(UPTO_PROXY, input.clone(), chain::UPTO_SETTLE_GAS_LIMIT, before);
        let (hash, receipt) = self.sent_and_mined(sending, "invalid_transaction_state", deadline_left(auth)).await?;
        if settled_by(&receipt) {
            return Ok(Settled { transaction: hash.to_string(), amount: Some(amount) });
        }
        // This transaction moved nothing. Permit2's nonce says whether the authorization was used all the same
        // (by another transaction); replaying the call on the block it failed in says why it reverted.
        let at = receipt.block_number.map(BlockId::number);
        let (used, replayed) =
            tokio::join!(permit2_nonce_used(&self.provider, auth), simulate(&self.provider, self.settler, input, at));
        let transaction = Some(hash.to_string());
        match used {
            Ok(true) => Err(SettleFailure {
                reason: "permit2_invalid_nonce".into(),
                message: "the authorization's Permit2 nonce is already used".into(),
                transaction,
                nothing_moved: false,
            }),
            Ok(false) => {
                let reason = match replayed {
                    Ok(Err(Some(revert))) => revert_reason(&revert),
                    _ => "invalid_transaction_state",
                };
                let message = "the settlement transaction reverted; nothing was charged".to_string();
                Err(SettleFailure::nothing_moved(reason, message, transaction))
            }
            Err(_) => Err(SettleFailure::pending(hash.to_string())),
        }
    }

    /// What is certain to fail before anything is signed, so no gas is spent on it.
    fn refuse_before_sending(&self, auth: &PermitAuthorization, amount: U256) -> Option<SettleFailure> {
        let (reason, message) = if amount.is_zero() {
            ("permit2_invalid_amount", "an upto settlement of 0 sends no transaction")
        } else if amount > auth.ceiling {
            (
                "invalid_upto_evm_payload_settlement_exceeds_amount",
                "the amount to settle exceeds the authorized ceiling",
            )
        } else if auth.facilitator != self.settler {
            (Rejection::UptoFacilitator.reason(), "the authorization names another facilitator")
        } else if deadline_left(auth) < Duration::from_secs(x402_proto::exact_evm::SETTLE_MARGIN_SECS) {
            ("permit2_deadline_expired", "the authorization expired before it could be settled")
        } else {
            return None;
        };
        Some(SettleFailure::nothing_moved(reason, message.into(), None))
    }

    /// Whether the proxy has code, asked until the answer is yes: it cannot go away.
    async fn upto_proxy_deployed(&self) -> Result<bool, TransportError> {
        if self.upto_proxy_seen.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let deployed = !self.provider.get_code_at(UPTO_PROXY).await?.is_empty();
        if deployed {
            self.upto_proxy_seen.store(true, Ordering::Relaxed);
        }
        Ok(deployed)
    }
}

/// Calldata of `settle`, or of `settleWithPermit` with `permit`, for `amount` of `auth`.
fn settle_calldata(auth: &PermitAuthorization, amount: U256, permit: Option<&Eip2612Permit>) -> Bytes {
    let signed = UptoProxy::PermitTransferFrom {
        permitted: UptoProxy::TokenPermissions { token: auth.token, amount: auth.ceiling },
        nonce: auth.nonce,
        deadline: auth.deadline,
    };
    let witness = UptoProxy::Witness { to: auth.pay_to, facilitator: auth.facilitator, validAfter: auth.valid_after };
    let signature = auth.signature.clone();
    let input = match permit {
        None => UptoProxy::settleCall { permit: signed, amount, owner: auth.from, witness, signature }.abi_encode(),
        Some(p) => UptoProxy::settleWithPermitCall {
            // USDC's ecrecover wants 27/28, whatever form the buyer sent.
            permit2612: UptoProxy::EIP2612Permit {
                value: p.value,
                deadline: p.deadline,
                r: p.r,
                s: p.s,
                v: if p.v < 27 { p.v + 27 } else { p.v },
            },
            permit: signed,
            amount,
            owner: auth.from,
            witness,
            signature,
        }
        .abi_encode(),
    };
    input.into()
}

/// `eth_call` of the proxy from `settler`, with the gas its transaction will have (on the latest block, or `at`).
/// `Err`: the node could not say.
async fn simulate(
    provider: &RootProvider,
    settler: Address,
    input: Bytes,
    at: Option<BlockId>,
) -> Result<Simulated, TransportError> {
    let call = TransactionRequest::default()
        .from(settler)
        .to(UPTO_PROXY)
        .input(input.into())
        .gas_limit(chain::UPTO_SETTLE_GAS_LIMIT);
    match provider.call(call).block_opt(at).await {
        Ok(_) => Ok(Ok(())),
        Err(err) => match err.as_error_resp() {
            Some(payload) => Ok(Err(payload.as_revert_data())),
            None => Err(err),
        },
    }
}

async fn permit2_allowance(provider: &RootProvider, auth: &PermitAuthorization) -> Result<U256, TransportError> {
    chain::view(provider, auth.token, Erc20Allowance::allowanceCall { owner: auth.from, spender: PERMIT2 }).await
}

/// Whether Permit2 has spent the authorization's nonce: its unordered nonces are bits, 256 to a word.
async fn permit2_nonce_used(provider: &RootProvider, auth: &PermitAuthorization) -> Result<bool, TransportError> {
    let word =
        chain::view(provider, PERMIT2, Permit2::nonceBitmapCall { owner: auth.from, wordPosition: auth.nonce >> 8 })
            .await?;
    Ok(word.bit(usize::from(auth.nonce.byte(0))))
}

/// Whether this receipt is of a settlement that moved the money: a successful call straight to the proxy, which
/// logged it (a call to an address without code also succeeds, and logs nothing).
fn settled_by(receipt: &TransactionReceipt) -> bool {
    let logged = receipt.inner.logs().iter().any(|log| {
        log.address() == UPTO_PROXY
            && matches!(
                log.topics().first(),
                Some(topic) if *topic == UptoProxy::Settled::SIGNATURE_HASH
                    || *topic == UptoProxy::SettledWithPermit::SIGNATURE_HASH
            )
    });
    receipt.status() && receipt.to == Some(UPTO_PROXY) && logged
}

/// The x402 reason for a settlement's revert, as the reference facilitator names the proxy's and Permit2's errors.
fn revert_reason(revert: &Bytes) -> &'static str {
    use Permit2::Permit2Errors as P;
    use UptoProxy::UptoProxyErrors as X;
    if let Ok(error) = X::abi_decode(revert) {
        return match error {
            X::AmountExceedsPermitted(_) => "upto_amount_exceeds_permitted",
            X::UnauthorizedFacilitator(_) => "upto_unauthorized_facilitator",
            X::InvalidAmount(_) => "permit2_invalid_amount",
            X::InvalidOwner(_) => "permit2_invalid_owner",
            X::InvalidDestination(_) => "permit2_invalid_destination",
            X::PaymentTooEarly(_) => "permit2_payment_too_early",
            X::Permit2612AmountMismatch(_) => "permit2_2612_amount_mismatch",
            X::ReentrancyGuardReentrantCall(_) => "invalid_transaction_state",
        };
    }
    match P::abi_decode(revert) {
        Ok(P::InvalidNonce(_)) => "permit2_invalid_nonce",
        Ok(P::InvalidAmount(_)) => "permit2_invalid_amount",
        Ok(
            P::SignatureExpired(_)
            | P::InvalidSignature(_)
            | P::InvalidSigner(_)
            | P::InvalidSignatureLength(_)
            | P::InvalidContractSignature(_),
        ) => "invalid_permit2_signature",
        // The token refused Permit2's transfer (balance or allowance), or something else: the reference's
        // catch-all.
        Err(_) => "invalid_exact_evm_transaction_failed",
    }
}

/// Permit2 pulls the tokens with solmate's `safeTransferFrom`, which reverts with this when the token refuses.
fn is_transfer_from_failure(revert: &Bytes) -> bool {
    Revert::abi_decode(revert).is_ok_and(|r| r.reason == "TRANSFER_FROM_FAILED")
}

/// How long the authorization can still be settled: Permit2 refuses it after its deadline.
fn deadline_left(auth: &PermitAuthorization) -> Duration {
    Duration::from_secs(auth.deadline_secs().saturating_sub(x402_proto::unix_now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverts_get_the_reference_facilitators_reasons_which_are_metric_labels() {
        let reverts: [(Vec<u8>, &str); 8] = [
            (UptoProxy::AmountExceedsPermitted {}.abi_encode(), "upto_amount_exceeds_permitted"),
            (UptoProxy::UnauthorizedFacilitator {}.abi_encode(), "upto_unauthorized_facilitator"),
            (UptoProxy::PaymentTooEarly {}.abi_encode(), "permit2_payment_too_early"),
            (UptoProxy::Permit2612AmountMismatch {}.abi_encode(), "permit2_2612_amount_mismatch"),
            (Permit2::InvalidNonce {}.abi_encode(), "permit2_invalid_nonce"),
            (Permit2::SignatureExpired { signatureDeadline: U256::from(1) }.abi_encode(), "invalid_permit2_signature"),
            (Permit2::InvalidAmount { maxAmount: U256::from(1) }.abi_encode(), "permit2_invalid_amount"),
            (Revert::from("TRANSFER_FROM_FAILED").abi_encode(), "invalid_exact_evm_transaction_failed"),
        ];
        for (revert, reason) in reverts {
            assert_eq!(revert_reason(&revert.into()), reason);
            assert_eq!(x402_proto::reason_label(reason), reason);
        }
        for refusal in ["permit2_invalid_amount", "invalid_upto_evm_payload_settlement_exceeds_amount"] {
            assert_eq!(x402_proto::reason_label(refusal), refusal);
        }
        assert!(is_transfer_from_failure(&Revert::from("TRANSFER_FROM_FAILED").abi_encode().into()));
        assert!(!is_transfer_from_failure(&Permit2::InvalidNonce {}.abi_encode().into()));
    }
}
