//! The respond stage of a paid call: the settlement receipt (`PAYMENT-RESPONSE` for v2 buyers,
//! `X-PAYMENT-RESPONSE` for v1) on a delivered answer, or a 402 that carries the failed settlement.

use crate::gate::Payment;
use crate::proxy::body::{json_response, Body};
use crate::settlement::{SettleFailure, Settled};
use crate::x402::challenge::{EXPOSE_HEADERS, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE};
use crate::x402::codec;
use crate::x402::wire::SettleResponse;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

/// Adds the successful settlement to an answer that is being delivered.
pub fn attach_receipt<B>(response: &mut Response<B>, payment: &Payment, settled: &Settled) {
    let receipt = SettleResponse {
        success: true,
        error_reason: None,
        payer: Some(payment.authorization.from.to_string()),
        transaction: settled.transaction.clone(),
        network: network_name(payment),
    };
    insert_receipt(response.headers_mut(), payment, &receipt);
}

/// A settlement failed: 402 with the failure in the payment-response header. The paid answer is withheld.
pub fn settle_failed(payment: &Payment, failure: &SettleFailure) -> Response<Body> {
    let receipt = SettleResponse {
        success: false,
        error_reason: Some(failure.reason.clone()),
        payer: Some(payment.authorization.from.to_string()),
        transaction: failure.transaction.clone().unwrap_or_default(),
        network: network_name(payment),
    };
    let body = serde_json::json!({
        "error": failure.reason,
        "message": failure.message,
        "transaction": failure.transaction,
    });
    let mut response = json_response(StatusCode::PAYMENT_REQUIRED, &body);
    insert_receipt(response.headers_mut(), payment, &receipt);
    response
}

fn insert_receipt(headers: &mut HeaderMap, payment: &Payment, receipt: &SettleResponse) {
    let name = if payment.version == 1 { X_PAYMENT_RESPONSE } else { PAYMENT_RESPONSE };
    if let Ok(value) = HeaderValue::from_str(&codec::encode(receipt)) {
        headers.insert(name, value);
    }
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSE_HEADERS));
}

/// v1 receipts name the network the v1 way.
fn network_name(payment: &Payment) -> String {
    match (&payment.offer.network.v1_name, payment.version) {
        (Some(v1), 1) => v1.clone(),
        _ => payment.offer.network.caip2.clone(),
    }
}
