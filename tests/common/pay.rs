//! A test buyer: signs EIP-3009 authorizations with an alloy signer and builds x402 v1/v2 payment headers,
//! the way the official clients do (from the 402 challenge's offer). Deliberately independent of the
//! gateway's own types, so that a wrong type hash or field order in the gateway fails the tests.

use alloy::primitives::{keccak256, Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::sol_types::{Eip712Domain, SolStruct};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

alloy::sol! {
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A nonce no other authorization in this test run uses.
pub fn fresh_nonce() -> B256 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    keccak256(format!(
        "{}-{}-{n}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
    ))
}

/// An authorization and the EIP-712 domain it is signed under; tests mutate either to make bad payments.
#[derive(Clone)]
pub struct Authorization {
    pub message: TransferWithAuthorization,
    pub domain_name: String,
    pub domain_version: String,
    pub chain_id: u64,
    pub token: Address,
}

impl Authorization {
    /// What a client signs for a v2 offer (`accepts[i]` of `PAYMENT-REQUIRED`).
    pub fn for_offer(from: Address, offer: &Value) -> Authorization {
        let now = now();
        let chain_id = offer["network"].as_str().unwrap().trim_start_matches("eip155:").parse().unwrap();
        Authorization {
            message: TransferWithAuthorization {
                from,
                to: offer["payTo"].as_str().unwrap().parse().unwrap(),
                value: offer["amount"].as_str().unwrap().parse().unwrap(),
                validAfter: U256::from(now - 600),
                validBefore: U256::from(now + offer["maxTimeoutSeconds"].as_u64().unwrap()),
                nonce: fresh_nonce(),
            },
            domain_name: offer["extra"]["name"].as_str().unwrap().to_string(),
            domain_version: offer["extra"]["version"].as_str().unwrap().to_string(),
            chain_id,
            token: offer["asset"].as_str().unwrap().parse().unwrap(),
        }
    }

    pub fn domain(&self) -> Eip712Domain {
        Eip712Domain::new(
            Some(self.domain_name.clone().into()),
            Some(self.domain_version.clone().into()),
            Some(U256::from(self.chain_id)),
            Some(self.token),
            None,
        )
    }

    /// The `exact` EVM payload: signature (65 bytes, v = 27/28) and the authorization as decimal strings.
    pub fn sign(&self, signer: &PrivateKeySigner) -> Value {
        let signature = signer.sign_hash_sync(&self.message.eip712_signing_hash(&self.domain())).unwrap();
        self.payload_with_signature(&format!("0x{}", alloy::hex::encode(signature.as_bytes())))
    }

    pub fn payload_with_signature(&self, signature: &str) -> Value {
        let m = &self.message;
        json!({
            "signature": signature,
            "authorization": {
                "from": m.from.to_string(),
                "to": m.to.to_string(),
                "value": m.value.to_string(),
                "validAfter": m.validAfter.to_string(),
                "validBefore": m.validBefore.to_string(),
                "nonce": m.nonce.to_string(),
            }
        })
    }
}

pub fn encode(value: &Value) -> String {
    STANDARD.encode(value.to_string())
}

/// `PAYMENT-SIGNATURE` value for a v2 payment of `accepted` (copied from the challenge, as clients do).
pub fn v2_header(resource: &Value, accepted: &Value, payload: Value) -> String {
    encode(
        &json!({ "x402Version": 2, "resource": resource, "accepted": accepted, "payload": payload, "extensions": {} }),
    )
}

/// `X-PAYMENT` value for a v1 payment.
pub fn v1_header(network: &str, payload: Value) -> String {
    encode(&json!({ "x402Version": 1, "scheme": "exact", "network": network, "payload": payload }))
}

/// Decodes the `PAYMENT-REQUIRED` header of a 402.
pub fn decode_header(value: &http::HeaderValue) -> Value {
    serde_json::from_slice(&STANDARD.decode(value.as_bytes()).expect("padded standard base64")).expect("JSON")
}
