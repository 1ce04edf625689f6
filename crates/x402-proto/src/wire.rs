//! x402 wire format, v1 and v2: the JSON carried in `PAYMENT-REQUIRED`, `PAYMENT-SIGNATURE`, `X-PAYMENT`
//! and the v1 402 body. Plain serde types: amounts and addresses stay strings here, as on the wire.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `extra` of an EVM `exact` offer: the token's EIP-712 domain name and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eip712Extra {
    pub name: String,
    pub version: String,
}

/// v2 `PaymentRequirements`. Fields a client may omit when echoing it back in `accepted` have defaults;
/// only the core fields are ever compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequirementsV2 {
    pub scheme: String,
    pub network: String,
    pub amount: String,
    pub asset: String,
    pub pay_to: String,
    #[serde(default)]
    pub max_timeout_seconds: u64,
    #[serde(default)]
    pub extra: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    pub url: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub mime_type: String,
}

/// v2 `PaymentRequired`, base64-encoded in the `PAYMENT-REQUIRED` header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV2 {
    pub x402_version: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub resource: ResourceInfo,
    pub accepts: Vec<RequirementsV2>,
    #[serde(default)]
    pub extensions: Map<String, Value>,
}

/// v1 `PaymentRequirements`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequirementsV1 {
    pub scheme: String,
    pub network: String,
    pub max_amount_required: String,
    pub resource: String,
    pub description: String,
    pub mime_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    pub asset: String,
    pub extra: Value,
}

/// v1 `PaymentRequirementsResponse`: the JSON body of a 402.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV1 {
    pub x402_version: u8,
    pub error: String,
    pub accepts: Vec<RequirementsV1>,
}

/// v2 `PaymentPayload` (decoded `PAYMENT-SIGNATURE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV2 {
    pub x402_version: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Value>,
    pub accepted: RequirementsV2,
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Value>,
}

/// v1 `PaymentPayload` (decoded `X-PAYMENT`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV1 {
    pub x402_version: u8,
    pub scheme: String,
    pub network: String,
    pub payload: Value,
}

/// The `exact` scheme's EVM payload: an EIP-3009 authorization and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactEvmPayload {
    pub signature: String,
    pub authorization: AuthorizationWire,
}

/// EIP-3009 `TransferWithAuthorization` as sent: numbers are decimal strings, `nonce` is 0x + 64 hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationWire {
    pub from: String,
    pub to: String,
    pub value: String,
    pub valid_after: String,
    pub valid_before: String,
    pub nonce: String,
}

/// The `upto` scheme's EVM payload: a Permit2 `PermitWitnessTransferFrom` and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UptoEvmPayload {
    pub signature: String,
    pub permit2_authorization: Permit2AuthorizationWire,
}

/// `permit2Authorization` as sent: numbers are decimal strings; `nonce` too (a uint256, not bytes32), as the
/// official clients send it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permit2AuthorizationWire {
    pub permitted: TokenPermissionsWire,
    pub from: String,
    pub spender: String,
    pub nonce: String,
    pub deadline: String,
    pub witness: UptoWitnessWire,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPermissionsWire {
    pub token: String,
    pub amount: String,
}

/// The upto proxy's witness: the payee, the only address that may settle, and the start of validity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UptoWitnessWire {
    pub to: String,
    pub facilitator: String,
    pub valid_after: String,
}

/// `SettleResponse` (v2, `PAYMENT-RESPONSE`) / `SettlementResponse` (v1, `X-PAYMENT-RESPONSE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    #[serde(default)]
    pub transaction: String,
    pub network: String,
    /// `upto`: the amount charged, atomic units (may be 0, with no transaction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
}
