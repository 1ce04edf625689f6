//! The respond stage of a paid call: the settlement receipt (`PAYMENT-RESPONSE` for v2 buyers,
//! `X-PAYMENT-RESPONSE` for v1) on a delivered answer, or a 402 that carries the failed settlement.

use crate::body::{json_response, Body};
use crate::gate::Payment;
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
        payer: Some(payment.authorization.payer().to_string()),
        transaction: settled.transaction.clone(),
        network: network_name(payment),
        amount: settled.amount.map(|amount| amount.to_string()),
    };
    insert_receipt(response.headers_mut(), payment, &receipt);
    keep_private(response.headers_mut());
}

/// The successful settlement as trailers, for an answer that streamed before it settled.
pub fn receipt_trailers(payment: &Payment, settled: &Settled) -> HeaderMap {
    let mut response = Response::new(());
    attach_receipt(&mut response, payment, settled);
    let mut trailers = response.into_parts().0.headers;
    // Trailers carry the receipt alone: response directives belong to the head.
    trailers.remove(header::CACHE_CONTROL);
    trailers.remove(header::ACCESS_CONTROL_EXPOSE_HEADERS);
    trailers
}

/// A paid answer is the buyer's alone (it carries their receipt): shared caches must not keep it. `private`
/// joins what the upstream said, `public` goes, and a `no-store` or `private` already there is left as it is.
pub fn keep_private(headers: &mut HeaderMap) {
    let directives: Vec<String> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|directive| !directive.is_empty())
        .map(String::from)
        .collect();
    if directives.iter().any(|d| d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("private")) {
        return;
    }
    let mut value = String::from("private");
    for directive in directives.iter().filter(|d| !d.eq_ignore_ascii_case("public")) {
        value.push_str(", ");
        value.push_str(directive);
    }
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(header::CACHE_CONTROL, value);
    }
}

/// A settlement failed: 402 with the failure in the payment-response header. The paid answer is withheld.
pub fn settle_failed(payment: &Payment, failure: &SettleFailure) -> Response<Body> {
    let receipt = SettleResponse {
        success: false,
        error_reason: Some(failure.reason.clone()),
        payer: Some(payment.authorization.payer().to_string()),
        transaction: failure.transaction.clone().unwrap_or_default(),
        network: network_name(payment),
        amount: None,
    };
    let body = serde_json::json!({
        "error": failure.reason,
        "message": failure.message,
        "transaction": failure.transaction,
    });
    let mut response = json_response(StatusCode::PAYMENT_REQUIRED, &body);
    insert_receipt(response.headers_mut(), payment, &receipt);
    // As every 402: the x402 spec asks that none is cached.
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn private_form(upstream: &[&str]) -> Vec<String> {
        let mut headers = HeaderMap::new();
        for value in upstream {
            headers.append(header::CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
        }
        keep_private(&mut headers);
        headers.get_all(header::CACHE_CONTROL).iter().map(|v| v.to_str().unwrap().to_string()).collect()
    }

    #[test]
    fn private_joins_what_the_upstream_said_and_never_loosens_it() {
        assert_eq!(private_form(&[]), ["private"]);
        assert_eq!(private_form(&["public, max-age=60"]), ["private, max-age=60"]);
        assert_eq!(private_form(&["max-age=60", "must-revalidate"]), ["private, max-age=60, must-revalidate"]);
        assert_eq!(private_form(&["no-store"]), ["no-store"]);
        assert_eq!(private_form(&["Private, max-age=5"]), ["Private, max-age=5"]);
    }
}
