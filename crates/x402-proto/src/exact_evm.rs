//! The `exact` scheme on EVM with EIP-3009: typed data, signature recovery and the verification checks,
//! in the order of the reference facilitator (signature, recipient, validBefore, validAfter, value).
//! Pure: no chain access. What only the chain knows (balance, nonce state) is checked when settling.

use crate::wire::ExactEvmPayload;
use crate::{Offer, Rejection};
use alloy_primitives::{b256, Address, Keccak256, Signature, B256, U256};
use alloy_sol_types::sol;
use alloy_sol_types::{Eip712Domain, SolStruct};
use serde::Deserialize;

sol! {
    /// EIP-3009's signed message; field order is part of the type hash.
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

/// Seconds an authorization must still be valid for its settlement transaction to land (as the reference).
pub const SETTLE_MARGIN_SECS: u64 = 6;
/// Clock skew tolerated beyond `maxTimeoutSeconds` when bounding how far ahead `validBefore` may be.
pub const CLOCK_SKEW_SECS: u64 = 900;

/// An authorization whose signature, payee, amount and time window passed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAuthorization {
    pub from: Address,
    pub to: Address,
    pub value: U256,
    pub valid_after: U256,
    pub valid_before: U256,
    pub nonce: B256,
    pub signature: Signature,
}

impl VerifiedAuthorization {
    /// Unix time after which the authorization can no longer be settled (saturating at `u64::MAX`).
    pub fn valid_before_secs(&self) -> u64 {
        u64::try_from(self.valid_before).unwrap_or(u64::MAX)
    }
}

/// An EIP-3009 token's EIP-712 domain: its name and version (the offer's `extra`), chain and address.
pub fn domain(name: &str, version: &str, chain_id: u64, token: Address) -> Eip712Domain {
    Eip712Domain::new(
        Some(name.to_string().into()),
        Some(version.to_string().into()),
        Some(U256::from(chain_id)),
        Some(token),
        None,
    )
}

/// `keccak256` of EIP-3009's `TransferWithAuthorization(...)` type string: fixed, so not hashed per payment.
const TRANSFER_TYPE_HASH: B256 = b256!("7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267");

/// EIP-712's `keccak256(0x1901 ‖ domainSeparator ‖ hashStruct(message))`, with the offer's precomputed
/// domain separator.
fn signing_hash(domain_separator: &B256, message: &TransferWithAuthorization) -> B256 {
    let mut struct_hasher = Keccak256::new();
    struct_hasher.update(TRANSFER_TYPE_HASH);
    struct_hasher.update(message.eip712_encode_data());
    let mut hasher = Keccak256::new();
    hasher.update([0x19, 0x01]);
    hasher.update(domain_separator);
    hasher.update(struct_hasher.finalize());
    hasher.finalize()
}

/// Verifies what the buyer signed of an `exact` EVM payload (the scheme-specific `payload` JSON) against the
/// offer it claims to pay: signature, payee, amount. The time window is `check_window`'s, separately, so that a
/// retry of an authorization already paid is recognised whatever the time.
pub fn verify_signed(payload: &serde_json::Value, offer: &Offer) -> Result<VerifiedAuthorization, Rejection> {
    let payload = ExactEvmPayload::deserialize(payload).map_err(|e| Rejection::MalformedPayload(e.to_string()))?;
    let auth = &payload.authorization;
    let message = TransferWithAuthorization {
        from: parse_address("from", &auth.from)?,
        to: parse_address("to", &auth.to)?,
        value: parse_uint("value", &auth.value)?,
        validAfter: parse_uint("validAfter", &auth.valid_after)?,
        validBefore: parse_uint("validBefore", &auth.valid_before)?,
        nonce: parse_nonce(&auth.nonce)?,
    };
    let signature = parse_signature(&payload.signature)?;

    let signer = signature
        .recover_address_from_prehash(&signing_hash(&offer.domain_separator, &message))
        .map_err(|_| Rejection::Signature)?;
    if signer != message.from {
        return Err(Rejection::Signature);
    }
    if message.to != offer.pay_to {
        return Err(Rejection::RecipientMismatch);
    }
    if message.value != offer.amount {
        return Err(Rejection::Amount);
    }
    Ok(VerifiedAuthorization {
        from: message.from,
        to: message.to,
        value: message.value,
        valid_after: message.validAfter,
        valid_before: message.validBefore,
        nonce: message.nonce,
        signature,
    })
}

/// The authorization can still be settled (with the reference's 6 s margin), is not signed for longer than
/// the offer allows (plus clock skew), and is already valid.
pub fn check_window(auth: &VerifiedAuthorization, offer: &Offer, now: u64) -> Result<(), Rejection> {
    if auth.valid_before < U256::from(now.saturating_add(SETTLE_MARGIN_SECS)) {
        return Err(Rejection::Expired);
    }
    // Bounds how long a reservation must be remembered: official clients sign now + maxTimeoutSeconds.
    let latest = now.saturating_add(offer.max_timeout_seconds).saturating_add(CLOCK_SKEW_SECS);
    if auth.valid_before > U256::from(latest) {
        return Err(Rejection::ValidityTooLong);
    }
    if auth.valid_after > U256::from(now) {
        return Err(Rejection::NotYetValid);
    }
    Ok(())
}

fn parse_address(field: &'static str, text: &str) -> Result<Address, Rejection> {
    match text.strip_prefix("0x") {
        Some(hex) if hex.len() == 40 => text.parse().map_err(|_| Rejection::field(field, "is not a 0x address")),
        _ => Err(Rejection::field(field, "is not a 0x address")),
    }
}

fn parse_uint(field: &'static str, text: &str) -> Result<U256, Rejection> {
    if text.is_empty() || text.len() > 78 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::field(field, "is not a decimal integer string"));
    }
    U256::from_str_radix(text, 10).map_err(|_| Rejection::field(field, "does not fit in uint256"))
}

fn parse_nonce(text: &str) -> Result<B256, Rejection> {
    match text.strip_prefix("0x") {
        Some(hex) if hex.len() == 64 => {
            text.parse().map_err(|_| Rejection::field("nonce", "is not 0x + 64 hex digits"))
        }
        _ => Err(Rejection::field("nonce", "is not 0x + 64 hex digits")),
    }
}

/// A 65-byte r‖s‖v ECDSA signature with v in {27, 28} (or 0/1) and low s, which EIP-3009 tokens accept.
/// Other lengths are smart-wallet signatures (ERC-1271/6492), which need the chain and are refused here.
fn parse_signature(text: &str) -> Result<Signature, Rejection> {
    let hex = text.strip_prefix("0x").ok_or(Rejection::Signature)?;
    if hex.len() != 130 {
        return Err(Rejection::Signature);
    }
    let mut bytes = [0u8; 65];
    alloy_primitives::hex::decode_to_slice(hex, &mut bytes).map_err(|_| Rejection::Signature)?;
    if !matches!(bytes[64], 0 | 1 | 27 | 28) {
        return Err(Rejection::Signature);
    }
    let signature = Signature::from_raw_array(&bytes).map_err(|_| Rejection::Signature)?;
    if signature.normalize_s().is_some() {
        return Err(Rejection::Signature);
    }
    Ok(signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_type_hash_and_signing_hash_are_eip712s() {
        let message = TransferWithAuthorization {
            from: Address::repeat_byte(1),
            to: Address::repeat_byte(2),
            value: U256::from(1000),
            validAfter: U256::from(5),
            validBefore: U256::from(7),
            nonce: B256::repeat_byte(3),
        };
        assert_eq!(message.eip712_type_hash(), TRANSFER_TYPE_HASH);
        let domain = domain("USD Coin", "2", 84532, Address::repeat_byte(4));
        assert_eq!(signing_hash(&domain.separator(), &message), message.eip712_signing_hash(&domain));
    }
}
