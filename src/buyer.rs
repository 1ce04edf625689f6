//! `x402-gateway pay URL`: a small buyer, for sellers to test a deployment end to end. It asks, reads the
//! 402 challenge, signs an EIP-3009 authorization for the first `exact` EVM offer it can afford, retries with
//! the payment, and reports the answer with its decoded settlement.

use crate::networks::chain_id_of;
use crate::proxy::client::https_client;
use crate::replay::unix_now;
use crate::x402::challenge::{
    PAYMENT_REQUIRED, PAYMENT_RESPONSE, PAYMENT_SIGNATURE, SCHEME_EXACT, X_PAYMENT, X_PAYMENT_RESPONSE,
};
use crate::x402::codec;
use crate::x402::exact_evm::{self, TransferWithAuthorization};
use crate::x402::wire::{
    AuthorizationWire, Eip712Extra, ExactEvmPayload, PaymentPayloadV1, PaymentPayloadV2, PaymentRequiredV1,
    PaymentRequiredV2, RequirementsV2, SettleResponse,
};
use alloy::primitives::{Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::sol_types::SolStruct;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use std::time::Duration;

/// Clients back-date `validAfter` so that a buyer's clock running ahead does not make the payment early.
const CLOCK_SKEW_SECS: u64 = 600;
const TIMEOUT: Duration = Duration::from_secs(120);

pub struct PayRequest {
    pub url: Uri,
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub signer: PrivateKeySigner,
    pub v1: bool,
    /// The most this buyer pays for one call, in the asset's atomic units.
    pub max_amount: U256,
}

pub struct PayOutcome {
    pub status: StatusCode,
    pub body: Bytes,
    /// The decoded `PAYMENT-RESPONSE` / `X-PAYMENT-RESPONSE`, when the answer carried one.
    pub settlement: Option<SettleResponse>,
    /// The offer a payment was signed for; `None` when the resource asked for none.
    pub payment: Option<RequirementsV2>,
    /// Why the payment was refused, when the answer to it is a fresh 402 (its `error`).
    pub refusal: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PayError {
    #[error("request failed: {0}")]
    Http(String),
    #[error("the 402 challenge cannot be read: {0}")]
    Challenge(String),
    #[error("no offer this client can pay: {0}")]
    NoOffer(String),
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A v2 `PAYMENT-SIGNATURE` value paying a 402 challenge's first `exact` EVM offer, with a fresh nonce, and
/// the amount it pays.
pub fn v2_payment(signer: &PrivateKeySigner, challenge: &HeaderMap) -> Result<(U256, HeaderValue), PayError> {
    let (offer, resource) = v2_offer(challenge)?;
    let amount = amount_of(&offer)?;
    let (_, header) = signed_header(signer, offer, resource, false)?;
    Ok((amount, header))
}

pub async fn pay(request: &PayRequest) -> Result<PayOutcome, PayError> {
    let first = send(request, None).await?;
    if first.0 != StatusCode::PAYMENT_REQUIRED {
        return Ok(outcome(first, None));
    }
    let (_, headers, body) = &first;
    let (offer, resource) = if request.v1 { v1_offer(body)? } else { v2_offer(headers)? };
    if amount_of(&offer)? > request.max_amount {
        return Err(PayError::NoOffer(format!(
            "the price {} is above --max-amount {}",
            offer.amount, request.max_amount
        )));
    }
    let (name, value) = signed_header(&request.signer, offer.clone(), resource, request.v1)?;
    let second = send(request, Some((name, value))).await?;
    Ok(outcome(second, Some(offer)))
}

fn amount_of(offer: &RequirementsV2) -> Result<U256, PayError> {
    U256::from_str_radix(&offer.amount, 10).map_err(|_| PayError::Challenge("the amount is not a number".into()))
}

/// Signs `offer` and wraps the payload as the header of the protocol version asked for: its name and value.
fn signed_header(
    signer: &PrivateKeySigner,
    offer: RequirementsV2,
    resource: Option<serde_json::Value>,
    v1: bool,
) -> Result<(HeaderName, HeaderValue), PayError> {
    let payload = sign(signer, &offer)?;
    let (name, header) = if v1 {
        let network = chain_id_of(&offer.network)
            .and_then(|id| crate::networks::builtin(id).v1_name)
            .ok_or_else(|| PayError::NoOffer(format!("{} has no v1 name", offer.network)))?;
        let payload = PaymentPayloadV1 { x402_version: 1, scheme: SCHEME_EXACT.into(), network, payload };
        (X_PAYMENT, codec::encode(&payload))
    } else {
        let payload = PaymentPayloadV2 { x402_version: 2, resource, accepted: offer, payload, extensions: None };
        (PAYMENT_SIGNATURE, codec::encode(&payload))
    };
    let value = HeaderValue::from_str(&header).map_err(|e| PayError::Sign(e.to_string()))?;
    Ok((name, value))
}

fn outcome((status, headers, body): (StatusCode, HeaderMap, Bytes), payment: Option<RequirementsV2>) -> PayOutcome {
    let settlement = headers
        .get(PAYMENT_RESPONSE)
        .or_else(|| headers.get(X_PAYMENT_RESPONSE))
        .and_then(|v| codec::decode::<SettleResponse>(v.as_bytes()).ok());
    // A fresh challenge after a payment carries the reason, in the v2 header or the v1 body.
    let refusal = (payment.is_some() && status == StatusCode::PAYMENT_REQUIRED)
        .then(|| {
            let v2 = headers.get(PAYMENT_REQUIRED).and_then(|v| codec::decode::<PaymentRequiredV2>(v.as_bytes()).ok());
            v2.and_then(|required| required.error)
                .or_else(|| serde_json::from_slice::<PaymentRequiredV1>(&body).ok().map(|required| required.error))
        })
        .flatten();
    PayOutcome { status, body, settlement, payment, refusal }
}

async fn send(
    request: &PayRequest,
    payment: Option<(HeaderName, HeaderValue)>,
) -> Result<(StatusCode, HeaderMap, Bytes), PayError> {
    let client = https_client::<Full<Bytes>>();
    let mut builder = Request::builder().method(request.method.clone()).uri(request.url.clone());
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    if let Some((name, value)) = payment {
        builder = builder.header(name, value);
    }
    let http_request = builder.body(Full::new(request.body.clone())).map_err(|e| PayError::Http(e.to_string()))?;
    let response = tokio::time::timeout(TIMEOUT, client.request(http_request))
        .await
        .map_err(|_| PayError::Http("no answer in time".into()))?
        .map_err(|e| PayError::Http(e.to_string()))?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| PayError::Http(e.to_string()))?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

fn v2_offer(headers: &HeaderMap) -> Result<(RequirementsV2, Option<serde_json::Value>), PayError> {
    let header = headers
        .get(PAYMENT_REQUIRED)
        .ok_or_else(|| PayError::Challenge("no PAYMENT-REQUIRED header (try --v1)".into()))?;
    let required: PaymentRequiredV2 =
        codec::decode(header.as_bytes()).map_err(|e| PayError::Challenge(e.to_string()))?;
    let offer = required
        .accepts
        .into_iter()
        .find(|o| o.scheme == SCHEME_EXACT && chain_id_of(&o.network).is_some())
        .ok_or_else(|| PayError::NoOffer("no `exact` offer on an EVM network".into()))?;
    Ok((offer, serde_json::to_value(required.resource).ok()))
}

/// A v1 offer, in the v2 shape this module signs from.
fn v1_offer(body: &[u8]) -> Result<(RequirementsV2, Option<serde_json::Value>), PayError> {
    let required: PaymentRequiredV1 = serde_json::from_slice(body).map_err(|e| PayError::Challenge(e.to_string()))?;
    let offer = required
        .accepts
        .into_iter()
        .find(|o| o.scheme == SCHEME_EXACT && chain_id_of(&o.network).is_some())
        .ok_or_else(|| PayError::NoOffer("no `exact` offer on an EVM network".into()))?;
    let chain_id = chain_id_of(&offer.network).unwrap_or_default();
    let offer = RequirementsV2 {
        scheme: offer.scheme,
        network: format!("eip155:{chain_id}"),
        amount: offer.max_amount_required,
        asset: offer.asset,
        pay_to: offer.pay_to,
        max_timeout_seconds: offer.max_timeout_seconds,
        extra: offer.extra,
    };
    Ok((offer, None))
}

/// Signs what the reference client signs: exactly the amount, to the payee, valid from 10 minutes ago
/// until `maxTimeoutSeconds` from now, with a random nonce.
fn sign(signer: &PrivateKeySigner, offer: &RequirementsV2) -> Result<serde_json::Value, PayError> {
    let bad = |what: &str| PayError::Challenge(format!("the offer's {what} is invalid"));
    let extra: Eip712Extra =
        serde_json::from_value(offer.extra.clone()).map_err(|_| bad("extra (EIP-712 name and version)"))?;
    let chain_id = chain_id_of(&offer.network).ok_or_else(|| bad("network"))?;
    let token: Address = offer.asset.parse().map_err(|_| bad("asset"))?;
    let now = unix_now();
    let message = TransferWithAuthorization {
        from: signer.address(),
        to: offer.pay_to.parse().map_err(|_| bad("payTo"))?,
        value: U256::from_str_radix(&offer.amount, 10).map_err(|_| bad("amount"))?,
        validAfter: U256::from(now.saturating_sub(CLOCK_SKEW_SECS)),
        validBefore: U256::from(now + offer.max_timeout_seconds.max(60)),
        nonce: B256::random(),
    };
    let domain = exact_evm::domain(&extra.name, &extra.version, chain_id, token);
    let signature =
        signer.sign_hash_sync(&message.eip712_signing_hash(&domain)).map_err(|e| PayError::Sign(e.to_string()))?;
    let payload = ExactEvmPayload {
        signature: alloy::hex::encode_prefixed(signature.as_bytes()),
        authorization: AuthorizationWire {
            from: message.from.to_string(),
            to: message.to.to_string(),
            value: message.value.to_string(),
            valid_after: message.validAfter.to_string(),
            valid_before: message.validBefore.to_string(),
            nonce: message.nonce.to_string(),
        },
    };
    serde_json::to_value(payload).map_err(|e| PayError::Sign(e.to_string()))
}
