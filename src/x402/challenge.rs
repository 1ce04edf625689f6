//! 402 answers: the v2 `PAYMENT-REQUIRED` header and the v1 JSON body on every challenge (so v1 and v2
//! clients both work against one route), or an HTML page for a browser. Offers render deterministically:
//! clients echo them back and the gate compares them field by field.

use super::codec;
use super::wire::{PaymentRequiredV1, PaymentRequiredV2, RequirementsV1, ResourceInfo};
use super::Rejection;
use crate::body::{full, Body};
use crate::options::Bazaar;
use crate::pricing::Offer;
use alloy::primitives::U256;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

// Header names as values, not strings: a string key is parsed again on every look-up.
pub const PAYMENT_REQUIRED: HeaderName = HeaderName::from_static("payment-required");
pub const PAYMENT_SIGNATURE: HeaderName = HeaderName::from_static("payment-signature");
pub const PAYMENT_RESPONSE: HeaderName = HeaderName::from_static("payment-response");
pub const X_PAYMENT: HeaderName = HeaderName::from_static("x-payment");
pub const X_PAYMENT_RESPONSE: HeaderName = HeaderName::from_static("x-payment-response");
/// Lets browser clients read the payment headers of cross-origin answers.
pub const EXPOSE_HEADERS: &str = "PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE";

pub use x402_proto::requirements::{requirements_v1, requirements_v2, SCHEME_EXACT};

/// The v1 body's `error` for an unpaid call. v2 clients read the header but show this body too, so it names
/// the header of each version.
const PAYMENT_HEADER_REQUIRED: &str = "PAYMENT-SIGNATURE (x402 v2) or X-PAYMENT (x402 v1) header is required";

/// Everything a 402 needs besides the offers: what is being sold and why the last attempt failed.
pub struct Challenge<'a> {
    pub offers: &'a [Offer],
    pub resource: ResourceInfo,
    /// `None` when no payment was sent.
    pub rejection: Option<&'a Rejection>,
    /// The route's discovery metadata, if it declares any.
    pub bazaar: Option<&'a Bazaar>,
}

impl Challenge<'_> {
    pub fn payment_required_v2(&self) -> PaymentRequiredV2 {
        PaymentRequiredV2 {
            x402_version: 2,
            error: Some(self.rejection.map_or("Payment required", Rejection::reason).to_string()),
            resource: self.resource.clone(),
            accepts: self.offers.iter().map(requirements_v2).collect(),
            extensions: self.extensions(),
        }
    }

    /// `payment-identifier` (idempotency: a retry with the same id gets the same answer) on every route, and
    /// the route's `bazaar` discovery metadata when it declares some.
    fn extensions(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut extensions = serde_json::Map::new();
        extensions.insert(
            "payment-identifier".into(),
            serde_json::json!({
                "info": { "required": false },
                "schema": {
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "type": "object",
                    "properties": {
                        "required": { "type": "boolean" },
                        "id": { "type": "string", "minLength": 16, "maxLength": 128, "pattern": "^[a-zA-Z0-9_-]+$" }
                    },
                    "required": ["required"]
                }
            }),
        );
        // A buyer who never approved Permit2 signs an EIP-2612 permit instead, which the settler submits: where
        // the token has `permit`.
        if self.offers.iter().any(|o| matches!(o.scheme, x402_proto::OfferScheme::Upto { .. }) && o.asset.eip2612) {
            extensions.insert(
                x402_proto::upto_evm::EIP2612_GAS_SPONSORING.into(),
                x402_proto::upto_evm::eip2612_extension_declaration(),
            );
        }
        if let Some(bazaar) = self.bazaar {
            extensions.insert("bazaar".into(), bazaar.extension.clone());
        }
        extensions
    }

    pub fn payment_required_v1(&self) -> PaymentRequiredV1 {
        PaymentRequiredV1 {
            x402_version: 1,
            error: self.rejection.map_or(PAYMENT_HEADER_REQUIRED, Rejection::reason).to_string(),
            accepts: self
                .offers
                .iter()
                .filter(|o| o.network.v1_name.is_some() && o.scheme == x402_proto::OfferScheme::Exact)
                .map(|o| RequirementsV1 {
                    output_schema: self.bazaar.map(|b| b.output_schema_v1.clone()),
                    ..requirements_v1(o, &self.resource)
                })
                .collect(),
        }
    }

    /// The v2 `PAYMENT-REQUIRED` header.
    pub fn header(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&codec::encode(&self.payment_required_v2())).ok()
    }

    /// The 402 response: always the v2 header; the v1 JSON body, or an HTML page for a browser.
    pub fn response(&self, request_headers: &HeaderMap) -> Response<Body> {
        let (content_type, body) = if self.rejection.is_none() && is_browser(request_headers) {
            ("text/html; charset=utf-8", self.html())
        } else {
            ("application/json", serde_json::to_string(&self.payment_required_v1()).unwrap_or_default())
        };
        let mut response = Response::new(full(body));
        *response.status_mut() = StatusCode::PAYMENT_REQUIRED;
        let headers = response.headers_mut();
        if let Some(value) = self.header() {
            headers.insert(PAYMENT_REQUIRED, value);
        }
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSE_HEADERS));
        response
    }

    fn html(&self) -> String {
        let offers: String = self
            .offers
            .iter()
            .map(|o| {
                format!(
                    "<li><strong>{} {}</strong> on {} (chain {}), paid to <code>{}</code></li>",
                    human_amount(o.amount, o.asset.decimals),
                    escape(&o.asset.symbol),
                    escape(o.network.v1_name.as_deref().unwrap_or(&o.network.caip2)),
                    o.network.chain_id,
                    o.pay_to
                )
            })
            .collect();
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Payment required</title></head><body>\
             <h1>402 Payment Required</h1><p>{}</p><p>Resource: <code>{}</code></p><p>Price, any one of:</p><ul>{offers}</ul>\
             <p>This resource is paid per call with the <a href=\"https://x402.org\">x402 protocol</a>. Call it with an \
             x402 client such as <code>@x402/fetch</code>, <code>x402-fetch</code> or the <code>x402</code> Python SDK: \
             it reads the <code>PAYMENT-REQUIRED</code> header, signs a USDC authorization and retries.</p></body></html>",
            escape(&self.resource.description),
            escape(&self.resource.url),
        )
    }
}

/// The reference SDKs' test: `Accept` has `text/html` and `User-Agent` has `Mozilla`.
fn is_browser(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, needle: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains(needle))
    };
    has(header::ACCEPT, "text/html") && has(header::USER_AGENT, "Mozilla")
}

/// `1500` with 6 decimals → `"0.0015"`.
pub fn human_amount(amount: U256, decimals: u8) -> String {
    let digits = amount.to_string();
    let decimals = usize::from(decimals);
    let padded = format!("{digits:0>width$}", width = decimals + 1);
    let (whole, fraction) = padded.split_at(padded.len() - decimals);
    let fraction = fraction.trim_end_matches('0');
    if fraction.is_empty() {
        whole.to_string()
    } else {
        format!("{whole}.{fraction}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_amounts() {
        assert_eq!(human_amount(U256::from(1500), 6), "0.0015");
        assert_eq!(human_amount(U256::from(2_000_000), 6), "2");
        assert_eq!(human_amount(U256::from(7), 0), "7");
    }
}
