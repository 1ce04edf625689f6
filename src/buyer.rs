//! `x402-gateway pay URL`: a small buyer, for sellers to test a deployment end to end. It asks, reads the
//! 402 challenge, signs for the first EVM offer of the scheme it pays (an EIP-3009 authorization for `exact`,
//! preferred when both are offered; a Permit2 witness transfer for `upto`, as the official clients sign it),
//! retries with the payment, and reports the answer with its decoded settlement.
//!
//! An `upto` payment settles through Permit2, which the buyer must have approved for the token: the official
//! clients sign an EIP-2612 permit instead when it has not (which needs the token's nonce from the chain), and
//! this client, which reads no chain, does not. Such a payment is answered 412 `permit2_allowance_required`.

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
    PaymentRequiredV2, Permit2AuthorizationWire, RequirementsV2, SettleResponse, TokenPermissionsWire, UptoEvmPayload,
    UptoWitnessWire,
};
use alloy::primitives::{Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::sol_types::SolStruct;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use x402_proto::upto_evm::{self, PermitWitnessTransferFrom, TokenPermissions, Witness};

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
    /// The scheme to pay; `None`: `exact` when offered, else `upto`.
    pub scheme: Option<PayScheme>,
    /// The most this buyer pays (or, for `upto`, authorizes) for one call, in the asset's atomic units.
    pub max_amount: U256,
}

/// A scheme this client pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayScheme {
    Exact,
    Upto,
}

impl PayScheme {
    pub fn name(self) -> &'static str {
        match self {
            PayScheme::Exact => SCHEME_EXACT,
            PayScheme::Upto => "upto",
        }
    }
}

/// The refusal of an `upto` payment whose buyer has not approved Permit2 for the token (HTTP 412).
pub const PERMIT2_ALLOWANCE_REQUIRED: &str = "permit2_allowance_required";

pub struct PayOutcome {
    pub status: StatusCode,
    pub body: Bytes,
    /// The decoded `PAYMENT-RESPONSE` / `X-PAYMENT-RESPONSE`, when the answer carried one.
    pub settlement: Option<SettleResponse>,
    /// The offer a payment was signed for; `None` when the resource asked for none.
    pub payment: Option<RequirementsV2>,
    /// Why the payment was refused, when the answer to it is a fresh 402, or a 412 (its `error`).
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
    let (offer, resource) = v2_offer(challenge, Some(PayScheme::Exact))?;
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
    let (offer, resource) = if request.v1 {
        if request.scheme == Some(PayScheme::Upto) {
            return Err(PayError::NoOffer("`upto` is paid with x402 v2 only: drop --v1".into()));
        }
        v1_offer(body)?
    } else {
        v2_offer(headers, request.scheme)?
    };
    if amount_of(&offer)? > request.max_amount {
        let what = if offer.scheme == SCHEME_EXACT { "price" } else { "ceiling" };
        return Err(PayError::NoOffer(format!(
            "the {what} {} is above --max-amount {}",
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
    let payload =
        if offer.scheme == SCHEME_EXACT { sign(signer, &offer)? } else { sign_upto(signer, &offer, unix_now())? };
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
    // A fresh challenge after a payment carries the reason, in the v2 header or the v1 body; so does the 412 of
    // an `upto` payment that Permit2 cannot move yet.
    let refused = matches!(status, StatusCode::PAYMENT_REQUIRED | StatusCode::PRECONDITION_FAILED);
    let refusal = (payment.is_some() && refused)
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

/// The first EVM offer of `scheme`; with none asked, the first `exact` one, else the first `upto` one.
fn v2_offer(
    headers: &HeaderMap,
    scheme: Option<PayScheme>,
) -> Result<(RequirementsV2, Option<serde_json::Value>), PayError> {
    let header = headers
        .get(PAYMENT_REQUIRED)
        .ok_or_else(|| PayError::Challenge("no PAYMENT-REQUIRED header (try --v1)".into()))?;
    let required: PaymentRequiredV2 =
        codec::decode(header.as_bytes()).map_err(|e| PayError::Challenge(e.to_string()))?;
    let schemes = match scheme {
        Some(scheme) => vec![scheme],
        None => vec![PayScheme::Exact, PayScheme::Upto],
    };
    let evm = |o: &&RequirementsV2, scheme: PayScheme| o.scheme == scheme.name() && chain_id_of(&o.network).is_some();
    let offer =
        schemes.iter().find_map(|&scheme| required.accepts.iter().find(|o| evm(o, scheme))).cloned().ok_or_else(
            || {
                let names: Vec<String> = schemes.iter().map(|s| format!("`{}`", s.name())).collect();
                PayError::NoOffer(format!("no {} offer on an EVM network", names.join(" or ")))
            },
        )?;
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

/// Signs what the official clients sign for an `upto` offer (`@x402/evm`'s `createUptoPermit2Payload`): a Permit2
/// `PermitWitnessTransferFrom` of the ceiling to the upto proxy, bound to the payee and the offer's
/// `extra.facilitatorAddress`, valid from 10 minutes before `now` until `maxTimeoutSeconds` after it, with a
/// random uint256 nonce. Numbers go as decimal strings.
fn sign_upto(signer: &PrivateKeySigner, offer: &RequirementsV2, now: u64) -> Result<serde_json::Value, PayError> {
    let bad = |what: &str| PayError::Challenge(format!("the offer's {what} is invalid"));
    let chain_id = chain_id_of(&offer.network).ok_or_else(|| bad("network"))?;
    let facilitator = offer.extra.get("facilitatorAddress").ok_or_else(|| {
        PayError::Challenge("the `upto` offer names no extra.facilitatorAddress, which the permit is bound to".into())
    })?;
    let facilitator: Address =
        facilitator.as_str().and_then(|a| a.parse().ok()).ok_or_else(|| bad("extra.facilitatorAddress"))?;
    let message = PermitWitnessTransferFrom {
        permitted: TokenPermissions {
            token: offer.asset.parse().map_err(|_| bad("asset"))?,
            amount: U256::from_str_radix(&offer.amount, 10).map_err(|_| bad("amount"))?,
        },
        spender: upto_evm::UPTO_PROXY,
        nonce: U256::from_be_bytes(B256::random().0),
        deadline: U256::from(now.saturating_add(offer.max_timeout_seconds)),
        witness: Witness {
            to: offer.pay_to.parse().map_err(|_| bad("payTo"))?,
            facilitator,
            validAfter: U256::from(now.saturating_sub(CLOCK_SKEW_SECS)),
        },
    };
    let domain = alloy::sol_types::eip712_domain! {
        name: "Permit2",
        chain_id: chain_id,
        verifying_contract: upto_evm::PERMIT2,
    };
    let signature =
        signer.sign_hash_sync(&message.eip712_signing_hash(&domain)).map_err(|e| PayError::Sign(e.to_string()))?;
    let payload = UptoEvmPayload {
        signature: alloy::hex::encode_prefixed(signature.as_bytes()),
        permit2_authorization: Permit2AuthorizationWire {
            from: signer.address().to_string(),
            permitted: TokenPermissionsWire {
                token: message.permitted.token.to_string(),
                amount: message.permitted.amount.to_string(),
            },
            spender: message.spender.to_string(),
            nonce: message.nonce.to_string(),
            deadline: message.deadline.to_string(),
            witness: UptoWitnessWire {
                to: message.witness.to.to_string(),
                facilitator: message.witness.facilitator.to_string(),
                valid_after: message.witness.validAfter.to_string(),
            },
        },
    };
    serde_json::to_value(payload).map_err(|e| PayError::Sign(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x402::challenge::requirements_v2;
    use crate::x402::wire::ResourceInfo;
    use alloy::primitives::address;
    use std::sync::Arc;
    use x402_proto::{networks, Offer, OfferScheme};

    const FACILITATOR: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");

    /// Base Sepolia's USDC at `amount`, of `scheme`.
    fn offer(scheme: OfferScheme, amount: u64) -> Offer {
        let network = networks::builtin(84532);
        let asset = network.asset("USDC").unwrap().clone();
        let domain_separator =
            exact_evm::domain(&asset.eip712_name, &asset.eip712_version, 84532, asset.address).separator();
        Offer {
            network: Arc::new(network),
            asset,
            pay_to: address!("209693Bc6afc0C5328bA36FaF03C514EF312287C"),
            amount: U256::from(amount),
            max_timeout_seconds: 300,
            domain_separator,
            scheme,
        }
    }

    fn challenge(offers: &[Offer]) -> HeaderMap {
        let required = PaymentRequiredV2 {
            x402_version: 2,
            error: None,
            resource: ResourceInfo {
                url: "http://127.0.0.1/v1/chat/completions".into(),
                description: String::new(),
                mime_type: "application/json".into(),
            },
            accepts: offers.iter().map(requirements_v2).collect(),
            extensions: Default::default(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(PAYMENT_REQUIRED, HeaderValue::from_str(&codec::encode(&required)).unwrap());
        headers
    }

    #[test]
    fn an_upto_payload_is_what_the_gateway_verifies() {
        let signer = PrivateKeySigner::random();
        let upto = offer(OfferScheme::Upto { facilitator: FACILITATOR }, 50_000);
        let now = unix_now();
        let payload = sign_upto(&signer, &requirements_v2(&upto), now).unwrap();
        let auth = upto_evm::verify_signed(&payload, None, &upto, FACILITATOR).unwrap();
        upto_evm::check_window(&auth, &upto, now).unwrap();
        assert_eq!((auth.from, auth.ceiling, auth.facilitator), (signer.address(), U256::from(50_000), FACILITATOR));
        assert_eq!(auth.deadline_secs(), now + 300);
        assert_eq!(auth.valid_after, U256::from(now - CLOCK_SKEW_SECS));
        // The wire shape of the official clients: decimal strings, the nonce a uint256.
        let permit = &payload["permit2Authorization"];
        for field in
            [&permit["nonce"], &permit["deadline"], &permit["permitted"]["amount"], &permit["witness"]["validAfter"]]
        {
            assert!(field.as_str().unwrap().bytes().all(|b| b.is_ascii_digit()), "{field}");
        }
        assert_eq!(permit["spender"], upto_evm::UPTO_PROXY.to_string());
        // Each payment has a fresh nonce.
        let again = sign_upto(&signer, &requirements_v2(&upto), now).unwrap();
        assert_ne!(again["permit2Authorization"]["nonce"], permit["nonce"]);
        // Bound to the facilitator the offer names: another settler refuses it.
        let elsewhere = upto_evm::verify_signed(&payload, None, &upto, Address::repeat_byte(9));
        assert_eq!(elsewhere, Err(x402_proto::Rejection::UptoFacilitator));
    }

    #[test]
    fn an_upto_offer_without_its_facilitator_cannot_be_signed() {
        let mut requirements = requirements_v2(&offer(OfferScheme::Upto { facilitator: FACILITATOR }, 1000));
        requirements.extra.as_object_mut().unwrap().remove("facilitatorAddress");
        let err = sign_upto(&PrivateKeySigner::random(), &requirements, unix_now()).unwrap_err();
        assert!(err.to_string().contains("extra.facilitatorAddress"), "{err}");
    }

    #[test]
    fn exact_is_preferred_unless_upto_is_asked_for() {
        let upto = offer(OfferScheme::Upto { facilitator: FACILITATOR }, 50_000);
        let exact = offer(OfferScheme::Exact, 2000);
        let both = challenge(&[upto.clone(), exact.clone()]);
        let chosen = |headers: &HeaderMap, scheme| v2_offer(headers, scheme).map(|(offer, _)| offer.scheme);
        assert_eq!(chosen(&both, None).unwrap(), "exact");
        assert_eq!(chosen(&both, Some(PayScheme::Upto)).unwrap(), "upto");
        let only_upto = challenge(&[upto]);
        assert_eq!(chosen(&only_upto, None).unwrap(), "upto");
        let err = chosen(&only_upto, Some(PayScheme::Exact)).unwrap_err().to_string();
        assert!(err.contains("no `exact` offer"), "{err}");
        let err = chosen(&challenge(&[exact]), Some(PayScheme::Upto)).unwrap_err().to_string();
        assert!(err.contains("no `upto` offer"), "{err}");
    }
}
