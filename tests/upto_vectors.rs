//! `upto` payments made by the official clients, `@x402/evm`'s `UptoEvmScheme` (`tests/interop/upto-sign.mjs`)
//! and the Python SDK's (`tests/interop/pay.py --payload`), for a 402 built from our own `extra` and
//! EIP-2612 declaration: the offline checks accept them, and refuse copies that pay another offer or that were
//! tampered with. No chain: the EIP-2612 permit's two chain reads are answered by the scripts (allowance 0,
//! nonce 0), the only chain data the clients use. Then the buyer harness (`pay.mjs`, `pay.py`) pays an `upto`
//! offer over HTTP, to a seller written here that runs the same checks.

mod common;

use alloy::primitives::{address, Address, U256};
use alloy::signers::local::PrivateKeySigner;
use common::tools::{self, Python};
use common::{spawn_upstream, Upstream};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use x402_gateway::proxy::body::full;
use x402_proto::upto_evm::{self, Eip2612Problem, PermitAuthorization};
use x402_proto::{codec, exact_evm, networks, unix_now, Offer, Rejection};

const FACILITATOR: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
const PAY_TO: Address = address!("209693Bc6afc0C5328bA36FaF03C514EF312287C");
const OTHER: Address = address!("90F79bf6EB2c4f870365E785982E1f101E93b906");

/// Base Sepolia's USDC, a 0.05 USDC ceiling, 300 s to pay.
fn offer() -> Offer {
    let network = networks::builtin(84532);
    let asset = network.asset("USDC").unwrap().clone();
    let domain_separator =
        exact_evm::domain(&asset.eip712_name, &asset.eip712_version, 84532, asset.address).separator();
    Offer {
        network: Arc::new(network),
        asset,
        pay_to: PAY_TO,
        amount: U256::from(50_000),
        max_timeout_seconds: 300,
        domain_separator,
        scheme: x402_proto::OfferScheme::Upto { facilitator: FACILITATOR },
    }
}

/// The 402 a route with `offer` as its `upto` offer answers, the EIP-2612 extension declared or not.
fn payment_required(offer: &Offer, declare_eip2612: bool) -> Value {
    let mut body = json!({
        "x402Version": 2,
        "error": "PAYMENT-SIGNATURE header is required",
        "resource": { "url": "http://127.0.0.1:8402/v1/chat/completions", "description": "", "mimeType": "application/json" },
        "accepts": [{
            "scheme": "upto",
            "network": offer.network.caip2,
            "amount": offer.amount.to_string(),
            "asset": offer.asset.address.to_string(),
            "payTo": offer.pay_to.to_string(),
            "maxTimeoutSeconds": offer.max_timeout_seconds,
            "extra": upto_evm::extra(offer, FACILITATOR),
        }],
    });
    if declare_eip2612 {
        body["extensions"] = json!({ upto_evm::EIP2612_GAS_SPONSORING: upto_evm::eip2612_extension_declaration() });
    }
    body
}

/// Runs an official client's script with the 402 on stdin and `buyer`'s key; returns the payment it printed.
fn sign(mut command: Command, required: &Value, buyer: &PrivateKeySigner) -> Value {
    let mut child = command
        .env("X402_TEST_BUYER_KEY", alloy::hex::encode_prefixed(buyer.to_bytes()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the client runs");
    child.stdin.take().unwrap().write_all(required.to_string().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{command:?} failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{command:?} printed no JSON ({e}): {stderr}"))
}

fn verify(payment: &Value, offer: &Offer, facilitator: Address) -> Result<PermitAuthorization, Rejection> {
    upto_evm::verify_signed(&payment["payload"], payment.get("extensions"), offer, facilitator)
}

/// `payment` with one field of its Permit2 authorization (a dotted path) replaced.
fn tampered(payment: &Value, field: &str, value: &str) -> Value {
    let mut copy = payment.clone();
    let mut target = &mut copy["payload"]["permit2Authorization"];
    for part in field.split('.') {
        target = &mut target[part];
    }
    assert!(target.is_string(), "{field} is in the official payment");
    *target = value.into();
    copy
}

/// What every official payment must pass, and what must refuse it.
fn check_official_payment(payment: &Value, buyer: &PrivateKeySigner, with_eip2612: bool) {
    let offer = offer();
    let auth = verify(payment, &offer, FACILITATOR).unwrap_or_else(|e| panic!("{e:?} for {payment}"));
    assert_eq!(auth.from, buyer.address());
    assert_eq!((auth.ceiling, auth.pay_to, auth.facilitator), (offer.amount, PAY_TO, FACILITATOR));
    let now = unix_now();
    assert_eq!(upto_evm::check_window(&auth, &offer, now), Ok(()));
    match &auth.eip2612 {
        Some(permit) => {
            assert!(with_eip2612, "a permit the 402 did not ask for");
            assert_eq!((permit.value, permit.deadline), (offer.amount, auth.deadline));
        }
        None => assert!(!with_eip2612, "no EIP-2612 permit although the 402 declared the extension"),
    }

    // The same payment against offers it was not signed for.
    let dearer = Offer { amount: offer.amount + U256::from(1), ..offer.clone() };
    assert_eq!(verify(payment, &dearer, FACILITATOR), Err(Rejection::Permit2Amount));
    let elsewhere = Offer { pay_to: OTHER, ..offer.clone() };
    assert_eq!(verify(payment, &elsewhere, FACILITATOR), Err(Rejection::Permit2Recipient));
    assert_eq!(verify(payment, &offer, OTHER), Err(Rejection::UptoFacilitator));
    let mut other_token = offer.clone();
    other_token.asset.address = OTHER;
    assert_eq!(verify(payment, &other_token, FACILITATOR), Err(Rejection::Permit2Token));
    // Late, or signed too long ahead.
    assert_eq!(upto_evm::check_window(&auth, &offer, auth.deadline_secs()), Err(Rejection::Permit2Deadline));
    let hasty = Offer { max_timeout_seconds: 0, ..offer.clone() };
    assert_eq!(upto_evm::check_window(&auth, &hasty, now - 901), Err(Rejection::Permit2DeadlineTooFar));

    // Tampered copies.
    let cases = [
        ("permitted.amount", "49999", Rejection::Permit2Amount),
        ("witness.to", "0x90F79bf6EB2c4f870365E785982E1f101E93b906", Rejection::Permit2Recipient),
        ("witness.facilitator", "0x90F79bf6EB2c4f870365E785982E1f101E93b906", Rejection::UptoFacilitator),
        ("spender", "0x402085c248EeA27D92E8b30b2C58ed07f9E20001", Rejection::Permit2Spender),
        ("permitted.token", "0x90F79bf6EB2c4f870365E785982E1f101E93b906", Rejection::Permit2Token),
        ("deadline", &(auth.deadline + U256::from(3600)).to_string(), Rejection::Permit2Signature),
        ("nonce", "1", Rejection::Permit2Signature),
    ];
    for (field, value, expected) in cases {
        assert_eq!(verify(&tampered(payment, field, value), &offer, FACILITATOR), Err(expected), "{field}");
    }
    if with_eip2612 {
        let mut copy = payment.clone();
        copy["extensions"][upto_evm::EIP2612_GAS_SPONSORING]["info"]["amount"] = U256::MAX.to_string().into();
        assert_eq!(verify(&copy, &offer, FACILITATOR), Err(Rejection::Eip2612(Eip2612Problem::Amount)));
    }
}

fn node_signs(node: &tools::Node, required: &Value, buyer: &PrivateKeySigner, eip2612: bool) -> Value {
    let mut command = node.script("upto-sign.mjs");
    command.args(["--key-env", "X402_TEST_BUYER_KEY"]);
    if eip2612 {
        command.args(["--eip2612-nonce", "0"]);
    }
    sign(command, required, buyer)
}

fn python_signs(python: &Python, required: &Value, buyer: &PrivateKeySigner, eip2612: bool) -> Value {
    let mut command = python.script("pay.py");
    command.args(["--payload", "--key-env", "X402_TEST_BUYER_KEY"]);
    if eip2612 {
        command.args(["--eip2612-nonce", "0"]);
    }
    sign(command, required, buyer)
}

#[test]
fn the_official_js_clients_upto_payments_verify_and_tampered_copies_do_not() {
    let Some(node) = tools::require(tools::node()) else { return };
    let buyer = PrivateKeySigner::random();
    let required = payment_required(&offer(), true);
    check_official_payment(&node_signs(&node, &required, &buyer, true), &buyer, true);
    // Declared, but the client cannot read the chain: it signs no permit, and echoes the declaration.
    let unfilled = node_signs(&node, &required, &buyer, false);
    assert_eq!(unfilled["extensions"], required["extensions"]);
    check_official_payment(&unfilled, &buyer, false);
    check_official_payment(&node_signs(&node, &payment_required(&offer(), false), &buyer, true), &buyer, false);
}

#[test]
fn the_official_python_clients_upto_payments_verify_and_tampered_copies_do_not() {
    let Some(python) = tools::require(tools::python()) else { return };
    let buyer = PrivateKeySigner::random();
    let required = payment_required(&offer(), true);
    check_official_payment(&python_signs(&python, &required, &buyer, true), &buyer, true);
    check_official_payment(&python_signs(&python, &required, &buyer, false), &buyer, false);
    check_official_payment(&python_signs(&python, &payment_required(&offer(), false), &buyer, true), &buyer, false);
}

/// A seller of `offer()`, standing in for an `upto` route: without a payment, a 402 (`PAYMENT-REQUIRED`);
/// with one, the offline checks, then 200 and the receipt of a settlement of 0 (no transaction), or a 402
/// whose `error` is the refusal's reason.
async fn spawn_upto_seller() -> Upstream {
    spawn_upstream(|request: Request<Incoming>| async move {
        let offer = offer();
        let checked = request.headers().get("payment-signature").map(|header| {
            let payment: Value = codec::decode(header.as_bytes()).map_err(|e| e.to_string())?;
            let auth = verify(&payment, &offer, FACILITATOR).map_err(|r| r.reason().to_string())?;
            upto_evm::check_window(&auth, &offer, unix_now()).map_err(|r| r.reason().to_string())?;
            Ok::<_, String>(auth)
        });
        let error = match checked {
            Some(Ok(auth)) => {
                let receipt = json!({
                    "success": true, "transaction": "", "network": offer.network.caip2,
                    "payer": auth.from.to_string(), "amount": "0",
                });
                let mut response = Response::new(full("paid"));
                response.headers_mut().insert("payment-response", codec::encode(&receipt).parse().unwrap());
                return response;
            }
            Some(Err(reason)) => reason,
            None => "PAYMENT-SIGNATURE header is required".to_string(),
        };
        let mut required = payment_required(&offer, false);
        required["error"] = error.into();
        let mut response = Response::new(full("{}"));
        *response.status_mut() = StatusCode::PAYMENT_REQUIRED;
        response.headers_mut().insert("payment-required", codec::encode(&required).parse().unwrap());
        response
    })
    .await
}

/// Runs a buyer harness script to pay `url`; returns the JSON line it printed.
async fn harness_pays(mut command: Command, url: &str, buyer: &PrivateKeySigner) -> Value {
    command
        .args(["--url", url, "--key-env", "X402_TEST_BUYER_KEY"])
        .env("X402_TEST_BUYER_KEY", alloy::hex::encode_prefixed(buyer.to_bytes()));
    let output = tokio::task::spawn_blocking(move || command.output().expect("the client runs")).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the client failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("no JSON line ({e}); stderr: {stderr}"))
}

fn assert_paid(line: &Value, buyer: &PrivateKeySigner) {
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["body"], "paid");
    assert_eq!(line["header"], "payment-response");
    assert_eq!(line["settlement"]["success"], true, "{line}");
    assert_eq!(line["settlement"]["payer"], buyer.address().to_string());
}

#[tokio::test]
async fn pay_mjs_pays_an_upto_offer() {
    let Some(node) = tools::require(tools::node()) else { return };
    let seller = spawn_upto_seller().await;
    let buyer = PrivateKeySigner::random();
    let mut command = node.script("pay.mjs");
    command.args(["--client", "v2"]);
    assert_paid(&harness_pays(command, &seller.url(), &buyer).await, &buyer);
    assert_eq!(seller.hits(), 2, "the 402, then the paid retry");
}

#[tokio::test]
async fn pay_py_pays_an_upto_offer() {
    let Some(python) = tools::require(tools::python()) else { return };
    let seller = spawn_upto_seller().await;
    let buyer = PrivateKeySigner::random();
    assert_paid(&harness_pays(python.script("pay.py"), &seller.url(), &buyer).await, &buyer);
    assert_eq!(seller.hits(), 2, "the 402, then the paid retry");
}
