//! The x402 protocol, apart from any transport or chain access: the v1/v2 wire types and header codec, the
//! reason strings, offers, verified payments and their replay keys, and the payment schemes (`exact` on EVM,
//! EIP-3009; `upto` on EVM, Permit2), checked offline. No HTTP server, runtime, configuration, storage or node
//! provider here.

pub mod codec;
pub mod exact_evm;
pub mod networks;
mod offer;
mod payment;
pub mod requirements;
mod scheme;
pub mod upto_evm;
pub mod wire;

pub use offer::{Offer, OfferScheme};
pub use payment::{Authorization, NonceKey, Payment};
pub use scheme::{Exact, Scheme};

/// Now, in unix seconds: the clock authorizations' time windows are read against.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why a payment was refused, with the x402 reason string a client sees (`invalidReason`/`error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("x402Version {0} is not supported")]
    Version(u64),
    #[error("scheme `{0}` is not offered for this resource")]
    Scheme(String),
    #[error("network `{0}` is not offered for this resource")]
    Network(String),
    #[error("the accepted requirements match none of this resource's offers")]
    NoMatchingOffer,
    #[error("the payment payload is malformed: {0}")]
    MalformedPayload(String),
    #[error("the signature does not recover the authorization's `from` address")]
    Signature,
    #[error("the authorization pays another address than this resource's payee")]
    RecipientMismatch,
    #[error("the authorization expires too soon to be settled")]
    Expired,
    #[error("the authorization's validBefore is further ahead than maxTimeoutSeconds allows")]
    ValidityTooLong,
    #[error("the authorization is not valid yet")]
    NotYetValid,
    #[error("the authorized value is not the price")]
    Amount,
    #[error("this authorization has already been used")]
    Replayed,
    #[error("the payer's balance does not cover the price")]
    InsufficientBalance,
    #[error("the transfer would fail on chain")]
    SimulationFailed,
    #[error("the permit's spender is not the x402 upto Permit2 proxy")]
    Permit2Spender,
    #[error("the permit's witness pays another address than this resource's payee")]
    Permit2Recipient,
    #[error("the permit's witness names another facilitator than this resource's settler")]
    UptoFacilitator,
    #[error("the permit's deadline is too close to settle it")]
    Permit2Deadline,
    #[error("the permit's deadline is further ahead than maxTimeoutSeconds allows")]
    Permit2DeadlineTooFar,
    #[error("the permit's validAfter is still ahead")]
    Permit2NotYetValid,
    #[error("the permit's amount is not this resource's ceiling")]
    Permit2Amount,
    #[error("the permit is for another token than this resource's asset")]
    Permit2Token,
    #[error("the signature does not recover the permit's `from` address")]
    Permit2Signature,
    #[error("the payer has not approved Permit2 for the ceiling, and sent no EIP-2612 permit")]
    Permit2AllowanceRequired,
    #[error("the payer's balance does not cover the ceiling")]
    Permit2InsufficientBalance,
    #[error("the settlement would fail on chain")]
    Permit2SimulationFailed,
    #[error("the EIP-2612 permit (extensions.eip2612GasSponsoring) is refused: {0}")]
    Eip2612(upto_evm::Eip2612Problem),
    #[error("refused by the facilitator: {reason} {message}")]
    Facilitator { reason: String, message: String },
}

impl Rejection {
    pub fn field(field: &'static str, problem: &'static str) -> Rejection {
        Rejection::MalformedPayload(format!("authorization.{field} {problem}"))
    }

    /// The reason string of the x402 reference (`typescript/packages/mechanisms/evm/.../errors.ts`
    /// and the spec's list).
    pub fn reason(&self) -> &str {
        match self {
            Rejection::Version(_) => "invalid_x402_version",
            Rejection::Scheme(_) => "unsupported_scheme",
            Rejection::Network(_) => "invalid_network",
            Rejection::NoMatchingOffer => "invalid_payment_requirements",
            Rejection::MalformedPayload(_) => "invalid_payload",
            Rejection::Signature => "invalid_exact_evm_signature",
            Rejection::RecipientMismatch => "invalid_exact_evm_recipient_mismatch",
            Rejection::Expired | Rejection::ValidityTooLong => "invalid_exact_evm_payload_authorization_valid_before",
            Rejection::NotYetValid => "invalid_exact_evm_payload_authorization_valid_after",
            Rejection::Amount => "invalid_exact_evm_authorization_value",
            Rejection::Replayed => "invalid_exact_evm_nonce_already_used",
            Rejection::InsufficientBalance => "invalid_exact_evm_insufficient_balance",
            Rejection::SimulationFailed => "invalid_exact_evm_transaction_simulation_failed",
            Rejection::Permit2Spender => "invalid_permit2_spender",
            Rejection::Permit2Recipient => "invalid_permit2_recipient_mismatch",
            Rejection::UptoFacilitator => "upto_facilitator_mismatch",
            Rejection::Permit2Deadline => "permit2_deadline_expired",
            Rejection::Permit2DeadlineTooFar => "permit2_deadline_too_far",
            Rejection::Permit2NotYetValid => "permit2_not_yet_valid",
            Rejection::Permit2Amount => "permit2_amount_mismatch",
            Rejection::Permit2Token => "permit2_token_mismatch",
            Rejection::Permit2Signature => "invalid_permit2_signature",
            Rejection::Permit2AllowanceRequired => "permit2_allowance_required",
            Rejection::Permit2InsufficientBalance => "permit2_insufficient_balance",
            Rejection::Permit2SimulationFailed => "permit2_simulation_failed",
            Rejection::Eip2612(problem) => problem.reason(),
            Rejection::Facilitator { reason, .. } => reason,
        }
    }
}

/// The reason strings a metric label may take: the gateway's own (`Rejection::reason` and the settlements'),
/// the x402 spec's list, and the exact-EVM ones of the reference facilitator.
const KNOWN_REASONS: &[&str] = &[
    // The gateway's own.
    "invalid_x402_version",
    "unsupported_scheme",
    "invalid_network",
    "invalid_payment_requirements",
    "invalid_payload",
    "invalid_exact_evm_signature",
    "invalid_exact_evm_recipient_mismatch",
    "invalid_exact_evm_payload_authorization_valid_before",
    "invalid_exact_evm_payload_authorization_valid_after",
    "invalid_exact_evm_authorization_value",
    "invalid_exact_evm_nonce_already_used",
    "invalid_exact_evm_insufficient_balance",
    "invalid_exact_evm_transaction_simulation_failed",
    "invalid_exact_evm_transaction_failed",
    "settlement_pending",
    "unexpected_settle_error",
    "invalid_payment",
    "too_many_payment_attempts",
    "invalid_permit2_spender",
    "invalid_permit2_recipient_mismatch",
    "upto_facilitator_mismatch",
    "permit2_deadline_expired",
    "permit2_deadline_too_far",
    "permit2_not_yet_valid",
    "permit2_amount_mismatch",
    "permit2_token_mismatch",
    "invalid_permit2_signature",
    "permit2_allowance_required",
    "permit2_insufficient_balance",
    "permit2_simulation_failed",
    "invalid_eip2612_extension_format",
    "eip2612_from_mismatch",
    "eip2612_asset_mismatch",
    "eip2612_spender_not_permit2",
    "eip2612_deadline_expired",
    "permit2_2612_amount_mismatch",
    "invalid_upto_evm_payload_settlement_exceeds_amount",
    // The reference facilitator's names for the upto proxy's and Permit2's reverts, which the settler reports too.
    "permit2_invalid_nonce",
    "permit2_invalid_amount",
    "permit2_invalid_owner",
    "permit2_invalid_destination",
    "permit2_payment_too_early",
    "permit2_2612_amount_mismatch",
    "upto_amount_exceeds_permitted",
    "upto_unauthorized_facilitator",
    // The spec's.
    "insufficient_funds",
    "invalid_exact_evm_payload_authorization_value",
    "invalid_exact_evm_payload_authorization_value_mismatch",
    "invalid_exact_evm_payload_signature",
    "invalid_exact_evm_payload_recipient_mismatch",
    "invalid_scheme",
    "invalid_transaction_state",
    "unexpected_verify_error",
    // The reference facilitator's.
    "invalid_exact_evm_scheme",
    "invalid_exact_evm_network_mismatch",
    "invalid_exact_evm_missing_eip712_domain",
    "invalid_exact_evm_payload_undeployed_smart_wallet",
    "invalid_exact_evm_token_name_mismatch",
    "invalid_exact_evm_token_version_mismatch",
    "invalid_exact_evm_eip3009_not_supported",
];

/// `reason` as a metric label: itself when known, else `other`. A remote facilitator's reason is free text,
/// which would otherwise make a new series of every message.
pub fn reason_label(reason: &str) -> &'static str {
    KNOWN_REASONS.iter().find(|known| **known == reason).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::{reason_label, Rejection};
    use crate::upto_evm::Eip2612Problem;

    #[test]
    fn the_gateways_own_reasons_are_labels_and_free_text_is_other() {
        let own = [
            Rejection::Version(3),
            Rejection::Scheme("upto".into()),
            Rejection::Network("eip155:1".into()),
            Rejection::NoMatchingOffer,
            Rejection::MalformedPayload("x".into()),
            Rejection::Signature,
            Rejection::RecipientMismatch,
            Rejection::Expired,
            Rejection::ValidityTooLong,
            Rejection::NotYetValid,
            Rejection::Amount,
            Rejection::Replayed,
            Rejection::InsufficientBalance,
            Rejection::SimulationFailed,
            Rejection::Permit2Spender,
            Rejection::Permit2Recipient,
            Rejection::UptoFacilitator,
            Rejection::Permit2Deadline,
            Rejection::Permit2DeadlineTooFar,
            Rejection::Permit2NotYetValid,
            Rejection::Permit2Amount,
            Rejection::Permit2Token,
            Rejection::Permit2Signature,
            Rejection::Permit2AllowanceRequired,
            Rejection::Permit2InsufficientBalance,
            Rejection::Permit2SimulationFailed,
            Rejection::Eip2612(Eip2612Problem::Format("x")),
            Rejection::Eip2612(Eip2612Problem::From),
            Rejection::Eip2612(Eip2612Problem::Asset),
            Rejection::Eip2612(Eip2612Problem::Spender),
            Rejection::Eip2612(Eip2612Problem::Amount),
            Rejection::Eip2612(Eip2612Problem::Deadline),
        ];
        for rejection in own {
            assert_eq!(reason_label(rejection.reason()), rejection.reason(), "{rejection:?}");
        }
        let known = Rejection::Facilitator { reason: "insufficient_funds".into(), message: String::new() };
        assert_eq!(reason_label(known.reason()), "insufficient_funds");
        for free_text in ["nonce too low for 0xabc", "", "Invalid_Payload", "invalid_payload "] {
            let rejection = Rejection::Facilitator { reason: free_text.into(), message: String::new() };
            assert_eq!(reason_label(rejection.reason()), "other", "{free_text:?}");
        }
    }
}
