//! The `upto` scheme on EVM with Permit2: the buyer signs a `PermitWitnessTransferFrom` of a ceiling to the
//! `x402UptoPermit2Proxy`, bound by its witness to one payee and one facilitator; the facilitator later settles
//! any amount up to that ceiling (`specs/schemes/upto/scheme_upto_evm.md`). Pure: no chain access.
//!
//! The checks run in the reference facilitator's order: spender, payee, facilitator, ceiling, token, signature
//! (`verify_signed`), with the time window apart (`check_window`), so that a retry of an authorization already
//! settled is recognised whatever the time. What only the chain knows (balance, Permit2 allowance, whether the
//! nonce is spent, whether the token takes the EIP-2612 permit) is the settler's to find out.
//!
//! Only EOA signatures are verified here (65 bytes, ECDSA). A smart wallet's (ERC-1271, or ERC-6492 before its
//! deployment) needs the chain to be checked and is refused as `invalid_permit2_signature`.

use crate::exact_evm::{CLOCK_SKEW_SECS, SETTLE_MARGIN_SECS};
use crate::wire::UptoEvmPayload;
use crate::{NonceKey, Offer, Rejection};
use alloy_primitives::{address, b256, Address, Bytes, Keccak256, Signature, B256, U256};
use alloy_sol_types::{sol, SolStruct};
use serde::Deserialize;
use serde_json::{json, Value};

/// The canonical Permit2 contract (same address on every chain).
pub const PERMIT2: Address = address!("000000000022D473030F116dDEE9F6B43aC78BA3");
/// The canonical `x402UptoPermit2Proxy` (CREATE2, same address on every chain): the permit's spender.
pub const UPTO_PROXY: Address = address!("4020A4f3b7b90ccA423B9fabCc0CE57C6C240002");
/// The key of the EIP-2612 gas-sponsoring extension, in a 402's `extensions` and in a payment's.
pub const EIP2612_GAS_SPONSORING: &str = "eip2612GasSponsoring";

sol! {
    /// Permit2's `ISignatureTransfer.TokenPermissions`.
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    /// The upto proxy's witness (`x402UptoPermit2Proxy.Witness`): the payee, the only address that may
    /// settle, and the start of validity.
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    /// What the buyer signs: Permit2's `PermitWitnessTransferFrom` with the upto witness (field order is part
    /// of the type hash). Permit2 takes `spender` from the caller, which is why it must be the proxy.
    struct PermitWitnessTransferFrom {
        TokenPermissions permitted;
        address spender;
        uint256 nonce;
        uint256 deadline;
        Witness witness;
    }
}

// The fixed hashes of Permit2's EIP-712 domain and of the signed types, so that none is hashed per payment.
/// `keccak256("EIP712Domain(string name,uint256 chainId,address verifyingContract)")`: Permit2's domain has no
/// version.
const DOMAIN_TYPE_HASH: B256 = b256!("8cad95687ba82c2ce50e74f7b754645e5117c3a5bec8151c0726d5857980a866");
/// `keccak256("Permit2")`.
const DOMAIN_NAME_HASH: B256 = b256!("9ac997416e8ff9d2ff6bebeb7149f65cdae5e32e2b90440b566bb3044041d36a");
const TOKEN_PERMISSIONS_TYPE_HASH: B256 = b256!("618358ac3db8dc274f0cd8829da7e234bd48cd73c4a740aede1adec9846d06a1");
const WITNESS_TYPE_HASH: B256 = b256!("d4171c445a74218b01d4fd8af34ff1106580ea1e36ff837e64484bfaa2253b75");
/// Of `PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,`
/// followed by the proxy's `WITNESS_TYPE_STRING`.
const PERMIT_WITNESS_TYPE_HASH: B256 = b256!("51dff6974ad4388c499e7fcfe838d2bd767162553a144098ce20ea661d70c2ee");

/// A Permit2 authorization whose signature, token, ceiling, payee and facilitator passed the offline checks
/// (`verify_signed`); its time window is `check_window`'s.
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
    /// The signature over the typed data, as sent (65 bytes, r ‖ s ‖ v).
    pub signature: Bytes,
    /// The buyer's EIP-2612 permit of the token to Permit2 (`extensions.eip2612GasSponsoring`), when sent.
    pub eip2612: Option<Eip2612Permit>,
}

impl PermitAuthorization {
    /// Unix time after which the permit can no longer be settled (saturating at `u64::MAX`).
    pub fn deadline_secs(&self) -> u64 {
        u64::try_from(self.deadline).unwrap_or(u64::MAX)
    }

    /// Unix time after which a settlement may fail: the earlier of the permit's deadline and, when sent, the
    /// EIP-2612 permit's (which the settlement needs if Permit2 has no allowance then).
    pub fn settle_by_secs(&self) -> u64 {
        let permit = self.eip2612.as_ref().map_or(u64::MAX, |p| u64::try_from(p.deadline).unwrap_or(u64::MAX));
        self.deadline_secs().min(permit)
    }

    /// The nonce as the replay guard keys it.
    pub fn nonce_key(&self) -> B256 {
        B256::from(self.nonce)
    }
}

/// An EIP-2612 `permit(owner, spender = Permit2, value, deadline, v, r, s)` signed by the buyer, so a buyer who
/// never approved Permit2 pays with no transaction of its own (the proxy's `settleWithPermit`). Its signature
/// is only split here: the token checks it, and the proxy goes on without it when the buyer's Permit2
/// allowance already covers the ceiling, as it then needs none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eip2612Permit {
    /// Equal to the ceiling: the proxy reverts otherwise (`Permit2612AmountMismatch`).
    pub value: U256,
    pub deadline: U256,
    pub v: u8,
    pub r: B256,
    pub s: B256,
}

/// Why an EIP-2612 permit sent with an `upto` payment is refused, with the reference's reason strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Eip2612Problem {
    #[error("{0}")]
    Format(&'static str),
    #[error("it is signed for another owner than the payment's `from`")]
    From,
    #[error("it permits another token than the payment's")]
    Asset,
    #[error("its spender is not Permit2")]
    Spender,
    #[error("its value is not the permit's ceiling, which the proxy requires")]
    Amount,
    #[error("its deadline is too close to settle it")]
    Deadline,
}

impl Eip2612Problem {
    pub fn reason(&self) -> &'static str {
        match self {
            Eip2612Problem::Format(_) => "invalid_eip2612_extension_format",
            Eip2612Problem::From => "eip2612_from_mismatch",
            Eip2612Problem::Asset => "eip2612_asset_mismatch",
            Eip2612Problem::Spender => "eip2612_spender_not_permit2",
            // The proxy's revert, which the reference facilitator reports under this name.
            Eip2612Problem::Amount => "permit2_2612_amount_mismatch",
            Eip2612Problem::Deadline => "eip2612_deadline_expired",
        }
    }
}

/// Permit2's domain separator on a chain: `EIP712Domain(name = "Permit2", chainId, verifyingContract = PERMIT2)`.
fn domain_separator(chain_id: u64) -> B256 {
    let mut hasher = Keccak256::new();
    hasher.update(DOMAIN_TYPE_HASH);
    hasher.update(DOMAIN_NAME_HASH);
    hasher.update(U256::from(chain_id).to_be_bytes::<32>());
    hasher.update(PERMIT2.into_word());
    hasher.finalize()
}

fn hash_struct(type_hash: B256, encoded: &[u8]) -> B256 {
    let mut hasher = Keccak256::new();
    hasher.update(type_hash);
    hasher.update(encoded);
    hasher.finalize()
}

/// EIP-712's `keccak256(0x1901 ‖ domainSeparator ‖ hashStruct(message))`, with the fixed type hashes.
fn signing_hash(chain_id: u64, message: &PermitWitnessTransferFrom) -> B256 {
    let mut struct_hasher = Keccak256::new();
    struct_hasher.update(PERMIT_WITNESS_TYPE_HASH);
    struct_hasher.update(hash_struct(TOKEN_PERMISSIONS_TYPE_HASH, &message.permitted.eip712_encode_data()));
    struct_hasher.update(message.spender.into_word());
    struct_hasher.update(message.nonce.to_be_bytes::<32>());
    struct_hasher.update(message.deadline.to_be_bytes::<32>());
    struct_hasher.update(hash_struct(WITNESS_TYPE_HASH, &message.witness.eip712_encode_data()));
    let mut hasher = Keccak256::new();
    hasher.update([0x19, 0x01]);
    hasher.update(domain_separator(chain_id));
    hasher.update(struct_hasher.finalize());
    hasher.finalize()
}

/// Verifies what the buyer signed of an `upto` EVM payload (the scheme's `payload` JSON) against the offer it
/// claims to pay and the settler that will settle it (`facilitator`, the offer's `extra.facilitatorAddress`):
/// spender, payee, facilitator, ceiling, token, signature; then the EIP-2612 permit in the payment's
/// `extensions`, when it carries one. A declaration the client left unfilled (the server's `info` without the
/// signed fields) is no permit, as for the reference facilitator.
pub fn verify_signed(
    payload: &Value,
    extensions: Option<&Value>,
    offer: &Offer,
    facilitator: Address,
) -> Result<PermitAuthorization, Rejection> {
    let payload = UptoEvmPayload::deserialize(payload).map_err(|e| Rejection::MalformedPayload(e.to_string()))?;
    let auth = &payload.permit2_authorization;
    let from = parse_address("from", &auth.from)?;
    let message = PermitWitnessTransferFrom {
        permitted: TokenPermissions {
            token: parse_address("permitted.token", &auth.permitted.token)?,
            amount: parse_uint("permitted.amount", &auth.permitted.amount)?,
        },
        spender: parse_address("spender", &auth.spender)?,
        nonce: parse_nonce(&auth.nonce)?,
        deadline: parse_uint("deadline", &auth.deadline)?,
        witness: Witness {
            to: parse_address("witness.to", &auth.witness.to)?,
            facilitator: parse_address("witness.facilitator", &auth.witness.facilitator)?,
            validAfter: parse_uint("witness.validAfter", &auth.witness.valid_after)?,
        },
    };

    if message.spender != UPTO_PROXY {
        return Err(Rejection::Permit2Spender);
    }
    if message.witness.to != offer.pay_to {
        return Err(Rejection::Permit2Recipient);
    }
    if message.witness.facilitator != facilitator {
        return Err(Rejection::UptoFacilitator);
    }
    if message.permitted.amount != offer.amount {
        return Err(Rejection::Permit2Amount);
    }
    if message.permitted.token != offer.asset.address {
        return Err(Rejection::Permit2Token);
    }
    let (signature, signature_bytes) = parse_signature(&payload.signature)?;
    let signer = signature
        .recover_address_from_prehash(&signing_hash(offer.network.chain_id, &message))
        .map_err(|_| Rejection::Permit2Signature)?;
    if signer != from {
        return Err(Rejection::Permit2Signature);
    }
    let eip2612 = eip2612_permit(extensions, from, &message.permitted)?;

    Ok(PermitAuthorization {
        from,
        token: message.permitted.token,
        ceiling: message.permitted.amount,
        nonce: message.nonce,
        deadline: message.deadline,
        pay_to: message.witness.to,
        facilitator: message.witness.facilitator,
        valid_after: message.witness.validAfter,
        signature: signature_bytes,
        eip2612,
    })
}

/// What identifies the permit against replay: Permit2's nonces are the owner's, across tokens.
pub fn replay_key(offer: &Offer, auth: &PermitAuthorization) -> NonceKey {
    NonceKey { chain_id: offer.network.chain_id, asset: PERMIT2, from: auth.from, nonce: auth.nonce_key() }
}

/// The permit can still be settled (with the reference's 6 s margin) and is already valid, and so is its
/// EIP-2612 permit. Its deadline may also be no further ahead than the offer's `maxTimeoutSeconds` (plus clock
/// skew), as for `exact`: the reference does not bound it, but the replay guard must remember an
/// authorization until its deadline, and the official clients sign now + `maxTimeoutSeconds`.
///
/// An `upto` permit is settled after its answer, so it must also leave time to serve one: at least half the
/// offer's `maxTimeoutSeconds` (the official clients sign all of it), and so must the EIP-2612 permit sent with
/// it. A buyer cannot sign a permit that lapses while its answer streams, to be served unpaid.
pub fn check_window(auth: &PermitAuthorization, offer: &Offer, now: u64) -> Result<(), Rejection> {
    let serve_and_settle_by = now.saturating_add((offer.max_timeout_seconds / 2).max(SETTLE_MARGIN_SECS));
    if auth.deadline < U256::from(serve_and_settle_by) {
        return Err(Rejection::Permit2Deadline);
    }
    let latest = now.saturating_add(offer.max_timeout_seconds).saturating_add(CLOCK_SKEW_SECS);
    if auth.deadline > U256::from(latest) {
        return Err(Rejection::Permit2DeadlineTooFar);
    }
    if auth.valid_after > U256::from(now) {
        return Err(Rejection::Permit2NotYetValid);
    }
    // The settlement may need the EIP-2612 permit too (no Permit2 allowance yet): it must last as long.
    if auth.eip2612.as_ref().is_some_and(|permit| permit.deadline < U256::from(serve_and_settle_by)) {
        return Err(Rejection::Eip2612(Eip2612Problem::Deadline));
    }
    Ok(())
}

/// `accepts[].extra` of an `upto` offer, as the reference server makes it: the token's EIP-712 name and
/// version (which the client's EIP-2612 permit is signed with), the transfer method, and the settler's address
/// the client binds the permit to.
pub fn extra(offer: &Offer, facilitator: Address) -> Value {
    json!({
        "name": offer.asset.eip712_name,
        "version": offer.asset.eip712_version,
        "assetTransferMethod": "permit2",
        "facilitatorAddress": facilitator.to_string(),
    })
}

/// The value of `extensions.eip2612GasSponsoring` in a 402, as the reference declares it
/// (`declareEip2612GasSponsoringExtension`): with it, the official clients of a buyer whose Permit2 allowance
/// is short sign an EIP-2612 permit and fill in its `info`.
pub fn eip2612_extension_declaration() -> Value {
    let address =
        |description: &str| json!({ "type": "string", "pattern": "^0x[a-fA-F0-9]{40}$", "description": description });
    let integer = |description: &str| json!({ "type": "string", "pattern": "^[0-9]+$", "description": description });
    json!({
        "info": {
            "description": "The facilitator accepts EIP-2612 gasless Permit to `Permit2` canonical contract.",
            "version": "1",
        },
        "schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "from": address("The address of the sender."),
                "asset": address("The address of the ERC-20 token contract."),
                "spender": address("The address of the spender (Canonical Permit2)."),
                "amount": integer("The amount to approve (uint256). Typically MaxUint."),
                "nonce": integer("The current nonce of the sender."),
                "deadline": integer("The timestamp at which the signature expires."),
                "signature": {
                    "type": "string",
                    "pattern": "^0x[a-fA-F0-9]+$",
                    "description": "The 65-byte concatenated signature (r, s, v) as a hex string.",
                },
                "version": {
                    "type": "string",
                    "pattern": "^[0-9]+(\\.[0-9]+)*$",
                    "description": "Schema version identifier.",
                },
            },
            "required": ["from", "asset", "spender", "amount", "nonce", "deadline", "signature", "version"],
        },
    })
}

/// The fields the client fills in; the server's declaration alone has only `description` and `version`.
const EIP2612_SIGNED_FIELDS: [&str; 8] =
    ["from", "asset", "spender", "amount", "nonce", "deadline", "signature", "version"];

/// The EIP-2612 permit in `extensions.eip2612GasSponsoring.info`, if the client filled it in (every signed
/// field present and non-empty, as the reference reads it), checked against the Permit2 authorization.
fn eip2612_permit(
    extensions: Option<&Value>,
    from: Address,
    permitted: &TokenPermissions,
) -> Result<Option<Eip2612Permit>, Rejection> {
    let Some(info) = extensions.and_then(|e| e.get(EIP2612_GAS_SPONSORING)).and_then(|e| e.get("info")) else {
        return Ok(None);
    };
    let filled = |field: &str| info.get(field).is_some_and(|value| !value.is_null() && value.as_str() != Some(""));
    if !EIP2612_SIGNED_FIELDS.iter().all(|field| filled(field)) {
        return Ok(None);
    }
    let refused = |problem| Rejection::Eip2612(problem);
    let text =
        |field: &str, problem: &'static str| info[field].as_str().ok_or(refused(Eip2612Problem::Format(problem)));
    let address = |field: &str, problem: &'static str| {
        text(field, problem).and_then(|t| hex_address(t).ok_or(refused(Eip2612Problem::Format(problem))))
    };
    let integer = |field: &str, problem: &'static str| {
        text(field, problem).and_then(|t| decimal(t).ok_or(refused(Eip2612Problem::Format(problem))))
    };
    let owner = address("from", "info.from is not a 0x address")?;
    let asset = address("asset", "info.asset is not a 0x address")?;
    let spender = address("spender", "info.spender is not a 0x address")?;
    let value = integer("amount", "info.amount is not a decimal uint256 string")?;
    integer("nonce", "info.nonce is not a decimal uint256 string")?;
    let deadline = integer("deadline", "info.deadline is not a decimal uint256 string")?;
    let signature = text("signature", "info.signature is not 65 bytes of 0x hex")?;
    let version = text("version", "info.version is not a dotted version number")?;
    if !version.split('.').all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())) {
        return Err(refused(Eip2612Problem::Format("info.version is not a dotted version number")));
    }
    let mut bytes = [0u8; 65];
    match signature.strip_prefix("0x") {
        Some(hex) if hex.len() == 130 => alloy_primitives::hex::decode_to_slice(hex, &mut bytes)
            .map_err(|_| refused(Eip2612Problem::Format("info.signature is not 65 bytes of 0x hex")))?,
        _ => return Err(refused(Eip2612Problem::Format("info.signature is not 65 bytes of 0x hex"))),
    }

    if owner != from {
        return Err(refused(Eip2612Problem::From));
    }
    if asset != permitted.token {
        return Err(refused(Eip2612Problem::Asset));
    }
    if spender != PERMIT2 {
        return Err(refused(Eip2612Problem::Spender));
    }
    if value != permitted.amount {
        return Err(refused(Eip2612Problem::Amount));
    }
    Ok(Some(Eip2612Permit {
        value,
        deadline,
        r: B256::from_slice(&bytes[..32]),
        s: B256::from_slice(&bytes[32..64]),
        v: bytes[64],
    }))
}

fn malformed(field: &'static str, problem: &'static str) -> Rejection {
    Rejection::MalformedPayload(format!("permit2Authorization.{field} {problem}"))
}

fn hex_address(text: &str) -> Option<Address> {
    match text.strip_prefix("0x") {
        Some(hex) if hex.len() == 40 => text.parse().ok(),
        _ => None,
    }
}

fn decimal(text: &str) -> Option<U256> {
    if text.is_empty() || text.len() > 78 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    U256::from_str_radix(text, 10).ok()
}

fn parse_address(field: &'static str, text: &str) -> Result<Address, Rejection> {
    hex_address(text).ok_or_else(|| malformed(field, "is not a 0x address"))
}

fn parse_uint(field: &'static str, text: &str) -> Result<U256, Rejection> {
    decimal(text).ok_or_else(|| malformed(field, "is not a decimal uint256 string"))
}

/// Permit2's nonce is a uint256: the official clients send it in decimal, the spec's example in 0x hex.
fn parse_nonce(text: &str) -> Result<U256, Rejection> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) if (1..=64).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            U256::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None => decimal(text),
    };
    parsed.ok_or_else(|| malformed("nonce", "is not a uint256 in decimal or 0x hex"))
}

/// A 65-byte r ‖ s ‖ v ECDSA signature with v in {27, 28}, the only values Permit2 hands to `ecrecover`, and
/// low s, as the official clients sign. Other lengths (EIP-2098 compact, or smart-wallet signatures) are
/// refused.
fn parse_signature(text: &str) -> Result<(Signature, Bytes), Rejection> {
    let hex = text.strip_prefix("0x").ok_or(Rejection::Permit2Signature)?;
    if hex.len() != 130 {
        return Err(Rejection::Permit2Signature);
    }
    let mut bytes = [0u8; 65];
    alloy_primitives::hex::decode_to_slice(hex, &mut bytes).map_err(|_| Rejection::Permit2Signature)?;
    if !matches!(bytes[64], 27 | 28) {
        return Err(Rejection::Permit2Signature);
    }
    let signature = Signature::from_raw_array(&bytes).map_err(|_| Rejection::Permit2Signature)?;
    if signature.normalize_s().is_some() {
        return Err(Rejection::Permit2Signature);
    }
    Ok((signature, Bytes::copy_from_slice(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact_evm;
    use crate::networks;
    use alloy_primitives::keccak256;
    use alloy_sol_types::Eip712Domain;
    use std::sync::Arc;

    /// What `@x402/evm` 2.27's `UptoEvmScheme` (through `x402Client.createPaymentPayload`) sent for a 402 with
    /// the offer below and the EIP-2612 extension declared, the buyer's EIP-2612 nonce being 3
    /// (`tests/interop/upto-sign.mjs --eip2612-nonce 3`, buyer key 0x11…11).
    const OFFICIAL: &str = r#"{
        "x402Version": 2,
        "payload": {
            "signature": "0x4a5a0a15e8d23dfc79db1b237a77e51b203615795da04a8780a5094732bed90d5360a21509307c8e571f533d43e5bcbd0d5ecf0eb513e9216ba8568d551225661c",
            "permit2Authorization": {
                "from": "0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A",
                "permitted": { "token": "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "amount": "50000" },
                "spender": "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002",
                "nonce": "60725465326734423488193115959565562268787537583452952267768369160206314471060",
                "deadline": "1796134822",
                "witness": {
                    "to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
                    "facilitator": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
                    "validAfter": "0"
                }
            }
        },
        "extensions": {
            "eip2612GasSponsoring": {
                "info": {
                    "description": "x",
                    "version": "1",
                    "from": "0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A",
                    "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                    "spender": "0x000000000022D473030F116dDEE9F6B43aC78BA3",
                    "amount": "50000",
                    "nonce": "3",
                    "deadline": "1796134822",
                    "signature": "0xc0383fe59b102f84651e67d4dedd9101fec260d1bf5232f085a931d3ec77e99d2b35956699978424ce42f67f0b2fccec478d9c25e0fb7ce0fe80b09f44742a3c1b"
                },
                "schema": { "type": "object" }
            }
        }
    }"#;
    const BUYER: Address = address!("19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A");
    const FACILITATOR: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
    const DEADLINE: u64 = 1_796_134_822;
    /// When the client signed: the deadline is now + maxTimeoutSeconds.
    const SIGNED_AT: u64 = DEADLINE - 300;

    fn offer() -> Offer {
        let network = networks::builtin(84532);
        let asset = network.assets[0].clone();
        let domain_separator =
            exact_evm::domain(&asset.eip712_name, &asset.eip712_version, 84532, asset.address).separator();
        Offer {
            network: Arc::new(network),
            asset,
            pay_to: address!("209693Bc6afc0C5328bA36FaF03C514EF312287C"),
            amount: U256::from(50_000),
            max_timeout_seconds: 300,
            domain_separator,
            scheme: crate::OfferScheme::Upto { facilitator: FACILITATOR },
        }
    }

    fn official() -> Value {
        serde_json::from_str(OFFICIAL).unwrap()
    }

    fn verify(payment: &Value) -> Result<PermitAuthorization, Rejection> {
        verify_signed(&payment["payload"], payment.get("extensions"), &offer(), FACILITATOR)
    }

    /// The official payment with `edit` applied to its JSON.
    fn verify_edited(edit: impl FnOnce(&mut Value)) -> Result<PermitAuthorization, Rejection> {
        let mut payment = official();
        edit(&mut payment);
        verify(&payment)
    }

    #[test]
    fn fixed_hashes_are_permit2s_and_eip712s() {
        // The proxy's `WITNESS_TYPE_STRING`, which Permit2 appends to its own stub.
        let witness_type_string = "Witness witness)TokenPermissions(address token,uint256 amount)\
                                   Witness(address to,address facilitator,uint256 validAfter)";
        let stub =
            "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,";
        assert_eq!(keccak256(format!("{stub}{witness_type_string}")), PERMIT_WITNESS_TYPE_HASH);
        let message = PermitWitnessTransferFrom {
            permitted: TokenPermissions { token: Address::repeat_byte(1), amount: U256::from(1000) },
            spender: UPTO_PROXY,
            nonce: U256::from(7),
            deadline: U256::from(9),
            witness: Witness {
                to: Address::repeat_byte(2),
                facilitator: Address::repeat_byte(3),
                validAfter: U256::ZERO,
            },
        };
        assert_eq!(message.eip712_type_hash(), PERMIT_WITNESS_TYPE_HASH);
        assert_eq!(message.permitted.eip712_type_hash(), TOKEN_PERMISSIONS_TYPE_HASH);
        assert_eq!(message.witness.eip712_type_hash(), WITNESS_TYPE_HASH);
        let domain = Eip712Domain::new(Some("Permit2".into()), None, Some(U256::from(84532)), Some(PERMIT2), None);
        assert_eq!(domain_separator(84532), domain.separator());
        assert_eq!(signing_hash(84532, &message), message.eip712_signing_hash(&domain));
    }

    #[test]
    fn the_official_clients_payment_with_its_eip2612_permit_verifies() {
        let auth = verify(&official()).unwrap();
        assert_eq!(auth.from, BUYER);
        assert_eq!(auth.token, offer().asset.address);
        assert_eq!(auth.ceiling, U256::from(50_000));
        assert_eq!(auth.pay_to, offer().pay_to);
        assert_eq!(auth.facilitator, FACILITATOR);
        assert_eq!(auth.valid_after, U256::ZERO);
        assert_eq!(auth.deadline_secs(), DEADLINE);
        assert_eq!(auth.signature.len(), 65);
        let permit = auth.eip2612.as_ref().expect("the EIP-2612 permit");
        assert_eq!((permit.value, permit.deadline, permit.v), (U256::from(50_000), U256::from(DEADLINE), 0x1b));
        assert_eq!(permit.r, b256!("c0383fe59b102f84651e67d4dedd9101fec260d1bf5232f085a931d3ec77e99d"));
        assert_eq!(permit.s, b256!("2b35956699978424ce42f67f0b2fccec478d9c25e0fb7ce0fe80b09f44742a3c"));
        check_window(&auth, &offer(), SIGNED_AT).unwrap();
    }

    #[test]
    fn a_nonce_in_hex_is_the_same_uint256() {
        let auth = verify(&official()).unwrap();
        let hex = format!("{:#x}", auth.nonce);
        let again = verify_edited(|p| p["payload"]["permit2Authorization"]["nonce"] = hex.into()).unwrap();
        assert_eq!(again.nonce_key(), auth.nonce_key());
    }

    #[test]
    fn a_declaration_the_client_left_unfilled_is_no_permit() {
        let auth = verify_edited(|p| {
            p["extensions"]["eip2612GasSponsoring"]["info"] = json!({ "description": "x", "version": "1" })
        })
        .unwrap();
        assert_eq!(auth.eip2612, None);
        let auth = verify_edited(|p| p["extensions"]["eip2612GasSponsoring"]["info"]["signature"] = "".into()).unwrap();
        assert_eq!(auth.eip2612, None);
        for extensions in [json!(null), json!({}), json!({ "eip2612GasSponsoring": "yes" }), json!([1])] {
            assert_eq!(verify_edited(|p| p["extensions"] = extensions).unwrap().eip2612, None);
        }
        let payment = official();
        assert_eq!(verify_signed(&payment["payload"], None, &offer(), FACILITATOR).unwrap().eip2612, None);
    }

    #[test]
    fn each_mismatch_with_the_offer_is_refused_in_the_reference_order() {
        let auth = |p: &mut Value, field: &str, value: &str| {
            let mut target = &mut p["payload"]["permit2Authorization"];
            for part in field.split('.') {
                target = &mut target[part];
            }
            *target = value.into();
        };
        let other = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";
        let cases = [
            ("spender", "0x402085c248EeA27D92E8b30b2C58ed07f9E20001", Rejection::Permit2Spender),
            ("witness.to", other, Rejection::Permit2Recipient),
            ("witness.facilitator", other, Rejection::UptoFacilitator),
            ("permitted.amount", "50001", Rejection::Permit2Amount),
            ("permitted.amount", "49999", Rejection::Permit2Amount),
            ("permitted.token", other, Rejection::Permit2Token),
            // Each field below is signed: changed, the signature recovers another address.
            ("nonce", "1", Rejection::Permit2Signature),
            ("deadline", "1796134823", Rejection::Permit2Signature),
            ("witness.validAfter", "1", Rejection::Permit2Signature),
            ("from", other, Rejection::Permit2Signature),
        ];
        for (field, value, expected) in cases {
            assert_eq!(verify_edited(|p| auth(p, field, value)), Err(expected), "{field} = {value}");
        }
        // The first check that fails is the one reported: spender before payee.
        let both = verify_edited(|p| {
            auth(p, "spender", other);
            auth(p, "witness.to", other);
        });
        assert_eq!(both, Err(Rejection::Permit2Spender));
        // The facilitator is the one the settler is, not the one the buyer names.
        let payment = official();
        let elsewhere = verify_signed(&payment["payload"], None, &offer(), Address::repeat_byte(9));
        assert_eq!(elsewhere, Err(Rejection::UptoFacilitator));
    }

    #[test]
    fn signatures_other_than_an_eoas_canonical_one_are_refused() {
        let signature = official()["payload"]["signature"].as_str().unwrap().to_string();
        let mut bytes = alloy_primitives::hex::decode(&signature).unwrap();
        // The same signature with s' = n - s and v flipped: valid for ecrecover, not canonical.
        let n = U256::from_str_radix("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141", 16).unwrap();
        let high_s = n - U256::from_be_slice(&bytes[32..64]);
        let mut malleable = bytes.clone();
        malleable[32..64].copy_from_slice(&high_s.to_be_bytes::<32>());
        malleable[64] = if bytes[64] == 27 { 28 } else { 27 };
        bytes[64] -= 27;
        let cases = [
            alloy_primitives::hex::encode_prefixed(&malleable),
            alloy_primitives::hex::encode_prefixed(&bytes),
            signature[..signature.len() - 2].to_string(),
            format!("{signature}00"),
            signature.trim_start_matches("0x").to_string(),
            format!("0x{}", "zz".repeat(65)),
            "0x".to_string(),
        ];
        for case in cases {
            let refused = verify_edited(|p| p["payload"]["signature"] = case.clone().into());
            assert_eq!(refused, Err(Rejection::Permit2Signature), "{case}");
        }
    }

    #[test]
    fn malformed_payloads_say_which_field() {
        type Edit = fn(&mut Value);
        let cases: [(&str, Edit); 8] = [
            ("missing field `permit2Authorization`", |p| p["payload"] = json!({ "signature": "0x" })),
            ("invalid type", |p| p["payload"]["permit2Authorization"]["deadline"] = json!(1796134822)),
            ("permit2Authorization.permitted.amount", |p| {
                p["payload"]["permit2Authorization"]["permitted"]["amount"] = "0xc350".into()
            }),
            ("permit2Authorization.permitted.amount", |p| {
                p["payload"]["permit2Authorization"]["permitted"]["amount"] = "1".repeat(79).into()
            }),
            ("permit2Authorization.deadline", |p| p["payload"]["permit2Authorization"]["deadline"] = "-1".into()),
            ("permit2Authorization.nonce", |p| p["payload"]["permit2Authorization"]["nonce"] = "0x".into()),
            ("permit2Authorization.nonce", |p| {
                p["payload"]["permit2Authorization"]["nonce"] = format!("0x1{}", "0".repeat(64)).into()
            }),
            ("permit2Authorization.witness.to", |p| {
                p["payload"]["permit2Authorization"]["witness"]["to"] =
                    "209693Bc6afc0C5328bA36FaF03C514EF312287C".into()
            }),
        ];
        for (expected, edit) in cases {
            match verify_edited(edit) {
                Err(Rejection::MalformedPayload(message)) => assert!(message.contains(expected), "{message}"),
                other => panic!("{expected}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_eip2612_permit_that_does_not_match_the_payment_is_refused() {
        let info =
            |p: &mut Value, field: &str, value: Value| p["extensions"]["eip2612GasSponsoring"]["info"][field] = value;
        let other = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";
        let cases = [
            ("from", json!(other), Eip2612Problem::From),
            ("asset", json!(other), Eip2612Problem::Asset),
            ("spender", json!("0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"), Eip2612Problem::Spender),
            ("amount", json!("50001"), Eip2612Problem::Amount),
            // The reference's "Typically MaxUint": the proxy reverts on any value but the ceiling.
            ("amount", json!(U256::MAX.to_string()), Eip2612Problem::Amount),
            ("amount", json!("5e4"), Eip2612Problem::Format("info.amount is not a decimal uint256 string")),
            ("nonce", json!(3), Eip2612Problem::Format("info.nonce is not a decimal uint256 string")),
            ("deadline", json!("0x1"), Eip2612Problem::Format("info.deadline is not a decimal uint256 string")),
            ("from", json!("0x19E7"), Eip2612Problem::Format("info.from is not a 0x address")),
            ("signature", json!("0xc0383f"), Eip2612Problem::Format("info.signature is not 65 bytes of 0x hex")),
            ("version", json!("1."), Eip2612Problem::Format("info.version is not a dotted version number")),
        ];
        for (field, value, problem) in cases {
            let refused = verify_edited(|p| info(p, field, value.clone()));
            assert_eq!(refused, Err(Rejection::Eip2612(problem)), "{field} = {value}");
        }
        assert!(verify_edited(|p| info(p, "version", json!("1.10.2"))).is_ok());
    }

    #[test]
    fn the_window_refuses_expired_too_long_and_early_permits() {
        let auth = verify(&official()).unwrap();
        let offer = offer();
        // Half the offer's 300 s must be left, to serve the answer and then settle it.
        assert_eq!(check_window(&auth, &offer, DEADLINE - 150), Ok(()));
        assert_eq!(check_window(&auth, &offer, DEADLINE - 149), Err(Rejection::Permit2Deadline));
        assert_eq!(check_window(&auth, &offer, DEADLINE - 300 - CLOCK_SKEW_SECS), Ok(()));
        let early = DEADLINE - 300 - CLOCK_SKEW_SECS - 1;
        assert_eq!(check_window(&auth, &offer, early), Err(Rejection::Permit2DeadlineTooFar));
        let later = PermitAuthorization { valid_after: U256::from(SIGNED_AT + 1), ..auth.clone() };
        assert_eq!(check_window(&later, &offer, SIGNED_AT), Err(Rejection::Permit2NotYetValid));
        assert_eq!(check_window(&later, &offer, SIGNED_AT + 1), Ok(()));
        let mut short_permit = auth.clone();
        short_permit.eip2612.as_mut().unwrap().deadline = U256::from(SIGNED_AT + 5);
        assert_eq!(check_window(&short_permit, &offer, SIGNED_AT), Err(Rejection::Eip2612(Eip2612Problem::Deadline)));
        // Long enough to settle now, not to serve first: refused as well, as the Permit2 deadline would be.
        short_permit.eip2612.as_mut().unwrap().deadline = U256::from(SIGNED_AT + 149);
        assert_eq!(check_window(&short_permit, &offer, SIGNED_AT), Err(Rejection::Eip2612(Eip2612Problem::Deadline)));
        short_permit.eip2612.as_mut().unwrap().deadline = U256::from(SIGNED_AT + 150);
        assert_eq!(check_window(&short_permit, &offer, SIGNED_AT), Ok(()));
        let far = PermitAuthorization { deadline: U256::MAX, ..auth };
        assert_eq!(far.deadline_secs(), u64::MAX);
        assert_eq!(check_window(&far, &offer, SIGNED_AT), Err(Rejection::Permit2DeadlineTooFar));
    }

    #[test]
    fn extra_and_the_extension_declaration_are_the_references() {
        assert_eq!(
            extra(&offer(), FACILITATOR),
            json!({
                "name": "USDC",
                "version": "2",
                "assetTransferMethod": "permit2",
                "facilitatorAddress": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
            })
        );
        let declaration = eip2612_extension_declaration();
        assert_eq!(declaration["info"]["version"], "1");
        let required: Vec<&str> =
            declaration["schema"]["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(required, EIP2612_SIGNED_FIELDS);
        for field in EIP2612_SIGNED_FIELDS {
            assert!(declaration["schema"]["properties"][field]["pattern"].is_string(), "{field}");
        }
        // Alone, the declaration is no permit.
        let extensions = json!({ EIP2612_GAS_SPONSORING: declaration });
        let payment = official();
        let auth = verify_signed(&payment["payload"], Some(&extensions), &offer(), FACILITATOR).unwrap();
        assert_eq!(auth.eip2612, None);
    }
}
