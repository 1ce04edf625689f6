//! The `upto` scheme on EVM with Permit2: the buyer signs a `PermitWitnessTransferFrom` of a ceiling to the
//! `x402UptoPermit2Proxy`, bound by its witness to one payee and one facilitator; the facilitator later settles
//! any amount up to that ceiling (`specs/schemes/upto/scheme_upto_evm.md`). Pure: no chain access.

use crate::{NonceKey, Offer, Rejection};
use alloy_primitives::{address, Address, Bytes, B256, U256};

/// The canonical Permit2 contract (same address on every chain).
pub const PERMIT2: Address = address!("000000000022D473030F116dDEE9F6B43aC78BA3");
/// The canonical `x402UptoPermit2Proxy` (CREATE2, same address on every chain): the permit's spender.
pub const UPTO_PROXY: Address = address!("4020A4f3b7b90ccA423B9fabCc0CE57C6C240002");

/// A Permit2 authorization whose signature, token, ceiling, payee, facilitator and time window passed the
/// offline checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermitAuthorization {
    /// The buyer (`permit2Authorization.from`, the permit's owner).
    pub from: Address,
    /// `permitted.token`: the offer's asset.
    pub token: Address,
    /// `permitted.amount`: the most that may be settled, equal to the offer's amount.
    pub ceiling: U256,
    /// Permit2's unordered nonce: one settlement per (owner, nonce), whatever the token.
    pub nonce: U256,
    /// Unix seconds after which Permit2 refuses the permit.
    pub deadline: U256,
    /// `witness.to`: the payee.
    pub pay_to: Address,
    /// `witness.facilitator`: the only address the proxy lets settle it.
    pub facilitator: Address,
    /// `witness.validAfter`.
    pub valid_after: U256,
    /// The signature over the typed data, as sent (65 bytes for an EOA).
    pub signature: Bytes,
    /// The buyer's EIP-2612 permit of the token to Permit2 (`extensions.eip2612GasSponsoring`), when sent.
    pub eip2612: Option<Eip2612Permit>,
}

impl PermitAuthorization {
    /// Unix time after which the permit can no longer be settled (saturating at `u64::MAX`).
    pub fn deadline_secs(&self) -> u64 {
        u64::try_from(self.deadline).unwrap_or(u64::MAX)
    }

    /// The nonce as the replay guard keys it.
    pub fn nonce_key(&self) -> B256 {
        B256::from(self.nonce)
    }
}

/// An EIP-2612 `permit(owner, spender = Permit2, value, deadline, v, r, s)` signed by the buyer, so a buyer who
/// never approved Permit2 pays with no transaction of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eip2612Permit {
    pub value: U256,
    pub deadline: U256,
    pub v: u8,
    pub r: B256,
    pub s: B256,
}

/// What identifies the permit against replay: Permit2's nonces are the owner's, across tokens.
pub fn replay_key(offer: &Offer, auth: &PermitAuthorization) -> NonceKey {
    NonceKey { chain_id: offer.network.chain_id, asset: PERMIT2, from: auth.from, nonce: auth.nonce_key() }
}

// LEAD-STUB: replaced by the offline verifier's versions.
pub fn extra(offer: &Offer, facilitator: Address) -> serde_json::Value {
    serde_json::json!({
        "name": offer.asset.eip712_name,
        "version": offer.asset.eip712_version,
        "facilitatorAddress": facilitator.to_string(),
    })
}

// LEAD-STUB
pub fn verify_signed(
    _payload: &serde_json::Value,
    _extensions: Option<&serde_json::Value>,
    _offer: &Offer,
    _facilitator: Address,
) -> Result<PermitAuthorization, Rejection> {
    Err(Rejection::Scheme("upto".into()))
}

// LEAD-STUB
pub fn check_window(_auth: &PermitAuthorization, _offer: &Offer, _now: u64) -> Result<(), Rejection> {
    Ok(())
}
