//! The x402 protocol: wire format and header codec, the `exact` EVM scheme, and 402 challenges.

pub mod challenge;
pub mod codec;
pub mod exact_evm;
pub mod wire;

/// Why a payment was refused, with the x402 reason string a client sees (`invalidReason`/`error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("x402Version {0} is not supported")]
    Version(u64),
    #[error("scheme `{0}` is not supported (this gateway takes `exact`)")]
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
            Rejection::Facilitator { reason, .. } => reason,
        }
    }
}
