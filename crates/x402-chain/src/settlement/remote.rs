//! A remote facilitator over its standard HTTP API: `POST /verify`, `POST /settle`, `GET /supported`.

use super::{SettleFailure, Settled, VerifyFailure};
use alloy::primitives::Address;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};
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
    /// The `facilitatorAddress` of each network's `upto` kind, as `/supported` last announced it.
    upto_signers: RwLock<HashMap<u64, Address>>,
    /// When `/supported` was last asked for want of an `upto` signer: at most once a `SIGNER_REFRESH`.
    signers_asked: Mutex<Option<Instant>>,
}

/// How often a request that finds no `upto` signer may make the gateway ask `/supported` again.
const SIGNER_REFRESH: Duration = Duration::from_secs(10);

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
    /// `upto`: what was charged, atomic units.
    #[serde(default, deserialize_with = "atomic_amount")]
    amount: Option<alloy::primitives::U256>,
}

fn atomic_amount<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<alloy::primitives::U256>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    Ok(text.and_then(|t| alloy::primitives::U256::from_str_radix(&t, 10).ok()))
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
        RemoteFacilitator {
            base,
            shown,
            auth,
            timeout,
            client: https_client(),
            upto_signers: RwLock::default(),
            signers_asked: Mutex::new(None),
        }
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
            (true, false) => Ok(Settled { transaction: answer.transaction, amount: answer.amount }),
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

    /// Its `/supported` answer; the `upto` signers it announces are remembered.
    pub async fn supported(&self) -> Result<Value, String> {
        match self.call(Method::GET, "/supported", None).await {
            Ok(value) => {
                let signers = upto_signers(&value);
                if let Ok(mut known) = self.upto_signers.write() {
                    *known = signers;
                }
                Ok(value)
            }
            Err(CallError::NoAnswer(why)) => Err(why),
            Err(CallError::BadAnswer(status)) => Err(format!("HTTP {status}")),
        }
    }

    /// The address its `upto` authorizations on `chain_id` must name, once `/supported` has announced it.
    pub fn upto_signer(&self, chain_id: u64) -> Option<Address> {
        self.upto_signers.read().ok().and_then(|known| known.get(&chain_id).copied())
    }

    /// Asks `/supported` for the `upto` signers, unless it was asked for them within `SIGNER_REFRESH`: requests
    /// that find none cannot make the gateway flood the facilitator.
    pub async fn learn_upto_signers(&self) {
        let due = match self.signers_asked.lock() {
            Ok(mut asked) if asked.is_none_or(|at| at.elapsed() >= SIGNER_REFRESH) => {
                *asked = Some(Instant::now());
                true
            }
            _ => false,
        };
        if due {
            if let Err(why) = self.supported().await {
                tracing::warn!(facilitator = %self.shown, "its upto signers cannot be learned: {why}");
            }
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

/// `kinds[]` of scheme `upto` name their settling address in `extra.facilitatorAddress`.
fn upto_signers(supported: &Value) -> HashMap<u64, Address> {
    let kinds = supported.get("kinds").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    kinds
        .iter()
        .filter(|kind| kind.get("scheme").and_then(Value::as_str) == Some("upto"))
        .filter_map(|kind| {
            let network = kind.get("network")?.as_str()?;
            let chain_id = network.strip_prefix("eip155:")?.parse().ok()?;
            let address = kind.pointer("/extra/facilitatorAddress")?.as_str()?.parse().ok()?;
            Some((chain_id, address))
        })
        .collect()
}

fn settle_may_have_broadcast(reason: &str) -> bool {
    reason == "settlement_pending" || reason == "unexpected_settle_error" || reason.contains("transaction")
}

fn unavailable(why: &str) -> VerifyFailure {
    VerifyFailure::Unavailable(format!("facilitator: {why}"))
}

#[cfg(test)]
mod tests {
    use super::{settle_may_have_broadcast, upto_signers};

    #[test]
    fn upto_signers_come_from_the_upto_kinds_of_supported() {
        let supported = serde_json::json!({ "kinds": [
            { "x402Version": 2, "scheme": "exact", "network": "eip155:84532", "extra": { "facilitatorAddress": "0x0000000000000000000000000000000000000001" } },
            { "x402Version": 2, "scheme": "upto", "network": "eip155:84532", "extra": { "facilitatorAddress": "0x00000000000000000000000000000000000000a2" } },
            { "x402Version": 2, "scheme": "upto", "network": "solana:abc", "extra": { "facilitatorAddress": "x" } },
            { "x402Version": 2, "scheme": "upto", "network": "eip155:8453" },
        ]});
        let signers = upto_signers(&supported);
        assert_eq!(signers.len(), 1);
        assert_eq!(
            signers[&84532],
            "0x00000000000000000000000000000000000000a2".parse::<alloy::primitives::Address>().unwrap()
        );
        assert!(upto_signers(&serde_json::json!({ "kinds": "nope" })).is_empty());
    }

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
