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
    /// The connection could not be made: the facilitator never saw the call.
    NotSent(String),
    /// Nothing came back (timed out, cut, unreadable): the facilitator may or may not have acted.
    NoAnswer(String),
    /// Turned away before being handled (429, 503) without the API's verdict.
    Busy(StatusCode),
    /// An answer that is not the API's JSON (a proxy's error page, a 500).
    BadAnswer(StatusCode),
}

/// What a call says about the facilitator itself, whatever it says about the payment: its concurrency limit
/// and its health learn from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Signal {
    /// It answered with a verdict.
    Answered,
    /// It is up but could not take more (a 429).
    Busy,
    /// Its signer raced its own nonces: it took more settlements at once than it can send.
    Raced,
    /// No usable answer: unreachable, timed out, an error page or a 503.
    Down,
}

/// One `/settle` call: its outcome, what it says about the facilitator, and whether a failure before any
/// broadcast may pass if sent again (busy, unreachable, a nonce race) rather than being the payment's own.
pub(super) struct SettleAttempt {
    pub outcome: Result<Settled, SettleFailure>,
    pub signal: Signal,
    pub transient: bool,
}

/// Messages of a chain node refusing the facilitator's transaction when it was submitted: nothing was
/// broadcast. The reference facilitator (`@x402/evm` 2.27) answers its signer's nonce races so under load,
/// `invalid_exact_evm_transaction_failed` with no transaction and viem's error as `errorMessage` ("Nonce provided
/// for the transaction is lower than the current nonce of the account. … Details: nonce too low", or "Transaction
/// creation failed. … Details: replacement transaction underpriced"). Each says so of a transaction other than
/// ours taking the nonce, or of the facilitator's gas; a reverted or lost transaction reads otherwise.
const NODE_REFUSALS: [(&str, Signal); 3] = [
    ("nonce too low", Signal::Raced),
    ("transaction underpriced", Signal::Raced),
    ("insufficient funds for gas", Signal::Answered),
];

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

    pub(super) async fn verify(&self, body: &Value) -> (Result<(), VerifyFailure>, Signal) {
        let value = match self.call(Method::POST, "/verify", Some(body)).await {
            Ok(value) => value,
            Err(err) => {
                let signal = err.signal();
                return (Err(unavailable(&err.to_string())), signal);
            }
        };
        let Ok(answer) = serde_json::from_value::<VerifyAnswer>(value) else {
            return (Err(unavailable("an answer without `isValid`")), Signal::Down);
        };
        if answer.is_valid {
            return (Ok(()), Signal::Answered);
        }
        let rejection = Rejection::Facilitator {
            reason: answer.invalid_reason.unwrap_or_else(|| "invalid_payment".into()),
            message: answer.invalid_message.unwrap_or_default(),
        };
        (Err(VerifyFailure::Rejected(rejection)), Signal::Answered)
    }

    pub(super) async fn settle(&self, body: &Value) -> SettleAttempt {
        let failed = |failure, signal, transient| SettleAttempt { outcome: Err(failure), signal, transient };
        let value = match self.call(Method::POST, "/settle", Some(body)).await {
            Ok(value) => value,
            // The facilitator did not take the call: nothing can have moved, and another may take it.
            Err(err @ (CallError::NotSent(_) | CallError::Busy(_))) => {
                let why = format!("facilitator: {err}");
                return failed(SettleFailure::nothing_moved("unexpected_settle_error", why, None), err.signal(), true);
            }
            Err(err) => return failed(SettleFailure::unknown(&err.to_string()), err.signal(), false),
        };
        let Ok(answer) = serde_json::from_value::<SettleAnswer>(value) else {
            let failure = SettleFailure::unknown("the facilitator's settle answer has no `success`");
            return failed(failure, Signal::Down, false);
        };
        match (answer.success, answer.transaction.is_empty()) {
            (true, false) => SettleAttempt {
                outcome: Ok(Settled { transaction: answer.transaction, amount: answer.amount }),
                signal: Signal::Answered,
                transient: false,
            },
            // A success without a transaction proves nothing: never serve on it.
            (true, true) => {
                let failure = SettleFailure::unknown("the facilitator reported success without a transaction");
                failed(failure, Signal::Answered, false)
            }
            (false, _) => {
                let reason = answer.error_reason.unwrap_or_else(|| "unexpected_settle_error".into());
                let message = answer.error_message.unwrap_or_default();
                let transaction = Some(answer.transaction).filter(|t| !t.is_empty());
                let refused_by_node = match transaction {
                    None => node_refusal(&message),
                    Some(_) => None,
                };
                if let Some(signal) = refused_by_node {
                    let failure = SettleFailure::nothing_moved(&reason, message, None);
                    return failed(failure, signal, true);
                }
                // Only a refusal that comes before any broadcast proves nothing moved. A failed or unconfirmed
                // transaction may still have moved money even when the facilitator names none (older reference
                // versions answer `invalid_exact_evm_transaction_failed` with `transaction: ""` after a broadcast):
                // such a row stays `settling` for reconciliation to settle by the authorization's on-chain state.
                let nothing_moved = transaction.is_none() && !settle_may_have_broadcast(&reason);
                failed(SettleFailure { reason, message, transaction, nothing_moved }, Signal::Answered, false)
            }
        }
    }

    /// Its `/supported` answer; the `upto` signers it announces are remembered.
    pub async fn supported(&self) -> Result<Value, String> {
        let value = self.call(Method::GET, "/supported", None).await.map_err(|err| err.to_string())?;
        if let Ok(mut known) = self.upto_signers.write() {
            *known = upto_signers(&value);
        }
        Ok(value)
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
            .map_err(|e| CallError::NotSent(format!("invalid facilitator URL: {e}")))?;
        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => return Err(CallError::NoAnswer("the facilitator did not answer in time".into())),
            Ok(Err(err)) if err.is_connect() => {
                return Err(CallError::NotSent(format!("the facilitator is unreachable: {err}")))
            }
            Ok(Err(err)) => return Err(CallError::NoAnswer(format!("the facilitator did not answer: {err}"))),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|_| CallError::NoAnswer("the facilitator's answer could not be read".into()))?
            .to_bytes();
        let busy = matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE);
        let not_handled = |status| if busy { CallError::Busy(status) } else { CallError::BadAnswer(status) };
        let value: Value = serde_json::from_slice(&bytes).map_err(|_| not_handled(status))?;
        // The reference client accepts a non-2xx answer that still carries the API's verdict.
        let carries_verdict = value.get("isValid").is_some() || value.get("success").is_some();
        if status.is_success() || carries_verdict {
            Ok(value)
        } else {
            Err(not_handled(status))
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

impl CallError {
    fn signal(&self) -> Signal {
        match self {
            CallError::Busy(StatusCode::TOO_MANY_REQUESTS) => Signal::Busy,
            _ => Signal::Down,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotSent(why) | CallError::NoAnswer(why) => f.write_str(why),
            CallError::Busy(status) => write!(f, "the facilitator is busy (HTTP {status})"),
            CallError::BadAnswer(status) => write!(f, "HTTP {status}"),
        }
    }
}

/// How the facilitator's failure message reads when a chain node refused its transaction at submission.
fn node_refusal(message: &str) -> Option<Signal> {
    let message = message.to_ascii_lowercase();
    NODE_REFUSALS.iter().find(|(marker, _)| message.contains(marker)).map(|(_, signal)| *signal)
}

fn settle_may_have_broadcast(reason: &str) -> bool {
    reason == "settlement_pending" || reason == "unexpected_settle_error" || reason.contains("transaction")
}

fn unavailable(why: &str) -> VerifyFailure {
    VerifyFailure::Unavailable(format!("facilitator: {why}"))
}

#[cfg(test)]
mod tests {
    use super::{node_refusal, settle_may_have_broadcast, upto_signers, Signal};

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
    fn a_node_refusing_the_transaction_at_submission_is_told_apart_from_a_failed_broadcast() {
        let race = "Nonce provided for the transaction is lower than the current nonce of the account.\n\
                    Try increasing the nonce or find the latest nonce with `getTransactionCount`.\n\nDetails: nonce too low";
        assert_eq!(node_refusal(race), Some(Signal::Raced));
        let replaced = "Transaction creation failed.\n\nDetails: replacement transaction underpriced";
        assert_eq!(node_refusal(replaced), Some(Signal::Raced));
        assert_eq!(node_refusal("Details: insufficient funds for gas * price + value"), Some(Signal::Answered));
        for moved_maybe in ["", "The request took too long to respond.", "execution reverted", "already known"] {
            assert_eq!(node_refusal(moved_maybe), None, "{moved_maybe}");
        }
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
