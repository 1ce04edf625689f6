//! How a payment travels with a request: where it arrives, and how the 402 and the receipt leave. HTTP
//! headers today ([`HttpHeaders`]); MCP's `_meta` next.

use crate::body::Body;
use crate::gate::Payment;
use crate::respond;
use crate::settlement::{SettleFailure, Settled};
use crate::x402::challenge::{Challenge, EXPOSE_HEADERS, PAYMENT_REQUIRED, PAYMENT_SIGNATURE, X_PAYMENT};
use http::{header, HeaderMap, HeaderValue, Response};

pub trait Carrier: Send + Sync {
    /// The encoded payment the request carries, if any.
    fn payment<'r>(&self, headers: &'r HeaderMap) -> Option<&'r [u8]>;

    /// Takes the payment out of a request before it goes upstream: it is for the gateway alone.
    fn strip(&self, headers: &mut HeaderMap);

    /// The 402 that asks for a payment, rendered for the client that sent `request_headers`.
    fn challenge(&self, challenge: &Challenge<'_>, request_headers: &HeaderMap) -> Response<Body>;

    /// The offer, on an answer served without being paid for (shadow mode), for x402 clients to see.
    fn offer(&self, response: &mut Response<Body>, challenge: &Challenge<'_>);

    /// The settlement's receipt, on the answer being delivered.
    fn attach_receipt(&self, response: &mut Response<Body>, payment: &Payment, settled: &Settled);

    /// The 402 of a settlement that failed: the answer is withheld.
    fn settle_failed(&self, payment: &Payment, failure: &SettleFailure) -> Response<Body>;

    /// The receipt of an answer that streamed before it settled, sent after it (HTTP trailers).
    fn receipt_trailers(&self, payment: &Payment, settled: &Settled) -> HeaderMap;

    /// The header naming what `receipt_trailers` sends, for the response head (`Trailer`).
    fn receipt_trailer_name(&self, payment: &Payment) -> HeaderValue;
}

/// x402 over HTTP: `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) in; `PAYMENT-REQUIRED` and the v1 JSON body
/// on a 402; `PAYMENT-RESPONSE` or `X-PAYMENT-RESPONSE` on the answer.
pub struct HttpHeaders;

impl Carrier for HttpHeaders {
    fn payment<'r>(&self, headers: &'r HeaderMap) -> Option<&'r [u8]> {
        headers.get(PAYMENT_SIGNATURE).or_else(|| headers.get(X_PAYMENT)).map(|value| value.as_bytes())
    }

    fn strip(&self, headers: &mut HeaderMap) {
        headers.remove(PAYMENT_SIGNATURE);
        headers.remove(X_PAYMENT);
    }

    fn challenge(&self, challenge: &Challenge<'_>, request_headers: &HeaderMap) -> Response<Body> {
        challenge.response(request_headers)
    }

    /// The v2 header alone: the answer's body and status are the upstream's.
    fn offer(&self, response: &mut Response<Body>, challenge: &Challenge<'_>) {
        let Some(value) = challenge.header() else { return };
        let headers = response.headers_mut();
        headers.insert(PAYMENT_REQUIRED, value);
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSE_HEADERS));
    }

    fn attach_receipt(&self, response: &mut Response<Body>, payment: &Payment, settled: &Settled) {
        respond::attach_receipt(response, payment, settled);
    }

    fn settle_failed(&self, payment: &Payment, failure: &SettleFailure) -> Response<Body> {
        respond::settle_failed(payment, failure)
    }

    fn receipt_trailers(&self, payment: &Payment, settled: &Settled) -> HeaderMap {
        respond::receipt_trailers(payment, settled)
    }

    fn receipt_trailer_name(&self, payment: &Payment) -> HeaderValue {
        HeaderValue::from_static(if payment.version == 1 { "X-PAYMENT-RESPONSE" } else { "PAYMENT-RESPONSE" })
    }
}
