//! A remote facilitator over its standard HTTP API: `POST /verify`, `POST /settle`, `GET /supported`.

use super::{SettleFailure, Settled, VerifyFailure};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;
use x402_proto::Rejection;

use crate::client::{https_client, HttpsClient};

const MAX_ANSWER_BYTES: usize = 1024 * 1024;

pub struct RemoteFacilitator {
    /// Base URL without a trailing slash.
    base: String,
    /// The base as it may be shown (readiness, warnings, the ledger): it often carries a key.
    shown: String,
    /// The operator's `facilitator_auth`, marked sensitive.
    auth: Option<HeaderValue>,
    timeout: Duration,
    client: HttpsClient<Full<Bytes>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerifyAnswer {
    is_valid: bool,
    invalid_reason: Option<String>,
    invalid_message: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SettleAnswer {
    success: bool,
    error_reason: Option<String>,
    error_message: Option<String>,
    #[serde(default)]
    transaction: String,
}

/// Why a call to the facilitator produced no usable answer.
enum CallError {
    /// Nothing came back (refused, timed out, unreadable): the facilitator may or may not have acted.
    NoAnswer(String),
    /// An answer that is not the API's JSON (a proxy's error page, a 500).
    BadAnswer(StatusCode),
}

impl RemoteFacilitator {
    pub fn new(base: String, auth: Option<HeaderValue>, timeout: Duration) -> RemoteFacilitator {
        let shown = crate::redacted_url(&base);
        RemoteFacilitator { base, shown, auth, timeout, client: https_client() }
    }

    /// The URL without what may be a key: the only form of it that is ever shown.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// The `/verify` and `/settle` body: the buyer's payload as sent, and our own requirements for it.
    pub fn body(version: u8, payload: &Value, requirements: &Value) -> Value {
        serde_json::json!({ "x402Version": version, "paymentPayload": payload, "paymentRequirements": requirements })
    }

    pub async fn verify(&self, body: &Value) -> Result<(), VerifyFailure> {
        let answer: VerifyAnswer = match self.call(Method::POST, "/verify", Some(body)).await {
            Ok(value) => serde_json::from_value(value).map_err(|_| unavailable("an answer without `isValid`"))?,
            Err(CallError::NoAnswer(why)) => return Err(unavailable(&why)),
            Err(CallError::BadAnswer(status)) => return Err(unavailable(&format!("HTTP {status}"))),
        };
        if answer.is_valid {
            return Ok(());
        }
        Err(VerifyFailure::Rejected(Rejection::Facilitator {
            reason: answer.invalid_reason.unwrap_or_else(|| "invalid_payment".into()),
            message: answer.invalid_message.unwrap_or_default(),
        }))
    }

    pub async fn settle(&self, body: &Value) -> Result<Settled, SettleFailure> {
        let answer: SettleAnswer = match self.call(Method::POST, "/settle", Some(body)).await {
            Ok(value) => serde_json::from_value(value)
                .map_err(|_| SettleFailure::unknown("the facilitator's settle answer has no `success`"))?,
            Err(CallError::NoAnswer(why)) => return Err(SettleFailure::unknown(&why)),
            Err(CallError::BadAnswer(status)) => return Err(SettleFailure::unknown(&format!("HTTP {status}"))),
        };
        match (answer.success, answer.transaction.is_empty()) {
            (true, false) => Ok(Settled { transaction: answer.transaction }),
            // A success without a transaction proves nothing: never serve on it.
            (true, true) => Err(SettleFailure::unknown("the facilitator reported success without a transaction")),
            (false, _) => {
                let reason = answer.error_reason.unwrap_or_else(|| "unexpected_settle_error".into());
                let transaction = Some(answer.transaction).filter(|t| !t.is_empty());
                // Only a refusal that comes before any broadcast proves nothing moved. A failed or unconfirmed
                // transaction may still have moved money even when the facilitator names none (the reference
                // answers `invalid_exact_evm_transaction_failed` with `transaction: ""` after a broadcast): such a
                // row stays `settling` for reconciliation to settle by the authorization's on-chain state.
                let nothing_moved = transaction.is_none() && !settle_may_have_broadcast(&reason);
                Err(SettleFailure {
                    reason,
                    message: answer.error_message.unwrap_or_default(),
                    transaction,
                    nothing_moved,
                })
            }
        }
    }

    pub async fn supported(&self) -> Result<Value, String> {
        match self.call(Method::GET, "/supported", None).await {
            Ok(value) => Ok(value),
            Err(CallError::NoAnswer(why)) => Err(why),
            Err(CallError::BadAnswer(status)) => Err(format!("HTTP {status}")),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
        let mut request = Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(auth) = &self.auth {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| CallError::NoAnswer(format!("invalid facilitator URL: {e}")))?;
        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => return Err(CallError::NoAnswer("the facilitator did not answer in time".into())),
            Ok(Err(err)) => return Err(CallError::NoAnswer(format!("the facilitator is unreachable: {err}"))),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|_| CallError::NoAnswer("the facilitator's answer could not be read".into()))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).map_err(|_| CallError::BadAnswer(status))?;
        // The reference client accepts a non-2xx answer that still carries the API's verdict.
        let carries_verdict = value.get("isValid").is_some() || value.get("success").is_some();
        if status.is_success() || carries_verdict {
            Ok(value)
        } else {
            Err(CallError::BadAnswer(status))
        }
    }
}

fn settle_may_have_broadcast(reason: &str) -> bool {
    reason == "settlement_pending" || reason == "unexpected_settle_error" || reason.contains("transaction")
}

fn unavailable(why: &str) -> VerifyFailure {
    VerifyFailure::Unavailable(format!("facilitator: {why}"))
}

#[cfg(test)]
mod tests {
    use super::settle_may_have_broadcast;

    #[test]
    fn only_refusals_before_a_broadcast_prove_nothing_moved() {
        for reason in ["invalid_exact_evm_transaction_failed", "settlement_pending", "unexpected_settle_error"] {
            assert!(settle_may_have_broadcast(reason), "{reason}");
        }
        for reason in ["invalid_exact_evm_signature", "invalid_exact_evm_insufficient_balance", "invalid_payload"] {
            assert!(!settle_may_have_broadcast(reason), "{reason}");
        }
    }
}
