//! Settlement through remote facilitators under load: several reference facilitators (`@x402/core` +
//! `@x402/evm`, each with its own signer on one anvil), payments signed by the official v2 client, and real
//! fronts written here that answer "busy" or an ambiguous failure before (or instead of) the reference.

mod common;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use base64::Engine;
use bytes::Bytes;
use common::chain::Chain;
use common::config::{GatewayToml, Payment, Route};
use common::facilitator::{start_reference_facilitator_with_key, Facilitator};
use common::tools::{require_node, Node};
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use x402_gateway::ledger::State;

const PRICE: u64 = 1000;
const BUYERS: usize = 64;

/// `[payment]` settled by `facilitators` (URL, weight), with no per-address cap (every buyer here is
/// 127.0.0.1), `/report` at `PRICE` and `/free`, and an admin listener.
fn gateway_toml(upstream: &Upstream, chain: &Chain, facilitators: &[(&str, u32)]) -> GatewayToml {
    let payment = Payment::usdc()
        .set("facilitators", facilitator_list(facilitators))
        .set("attempt_rate_per_ip", 1_000_000)
        .set("attempt_burst_per_ip", 1_000_000);
    GatewayToml::new()
        .listen()
        .admin()
        .upstream("api", &upstream.url())
        .payment(payment)
        .route(Route::paid("/report", "api", &PRICE.to_string()))
        .route(Route::free("/free", "api"))
        .network(chain.network())
}

fn facilitator_list(facilitators: &[(&str, u32)]) -> toml::Value {
    let entry = |(url, weight): &(&str, u32)| {
        toml::Value::Table(toml::Table::from_iter([
            ("url".to_string(), (*url).into()),
            ("weight".to_string(), i64::from(*weight).into()),
        ]))
    };
    toml::Value::Array(facilitators.iter().map(entry).collect())
}

/// The `PAYMENT-REQUIRED` header of an unpaid call to `path`.
async fn payment_required(gateway: &Gateway, path: &str) -> String {
    let unpaid = get(&gateway.url(path)).await;
    assert_eq!(unpaid.status, StatusCode::PAYMENT_REQUIRED);
    unpaid.headers["payment-required"].to_str().unwrap().to_string()
}

/// `per_buyer` payments from each buyer, signed by the official v2 client (`sign.mjs`), buyer by buyer.
async fn official_payments(node: &Node, required: &str, buyers: &[PrivateKeySigner], per_buyer: usize) -> Vec<String> {
    let keys: Vec<String> = buyers.iter().map(|b| alloy::hex::encode_prefixed(b.to_bytes())).collect();
    let mut command = node.script("sign.mjs");
    command
        .args(["--payment-required", required, "--keys-env", "X402_TEST_BUYER_KEYS", "--per-key"])
        .arg(per_buyer.to_string())
        .env("X402_TEST_BUYER_KEYS", keys.join(","));
    let output = tokio::task::spawn_blocking(move || command.output().expect("node runs")).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "sign.mjs failed: {stderr}");
    let signed: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("sign.mjs: {e}; {stderr}"));
    let headers: Vec<String> =
        signed["headers"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect();
    assert_eq!(headers.len(), buyers.len() * per_buyer);
    headers
}

async fn pay(url: String, header: String) -> Answer {
    let request = Request::get(url).header("payment-signature", header).body(Full::default()).unwrap();
    send(&client(), request).await
}

/// Every payment sent at once.
async fn pay_all(gateway: &Gateway, path: &str, headers: Vec<String>) -> Vec<Answer> {
    let mut calls = tokio::task::JoinSet::new();
    for header in headers {
        calls.spawn(pay(gateway.url(path), header));
    }
    calls.join_all().await
}

/// The transaction of a paid answer's receipt (`PAYMENT-RESPONSE`), once it says the payment settled.
fn settled_transaction(answer: &Answer) -> String {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let receipt = base64::engine::general_purpose::STANDARD.decode(answer.headers["payment-response"].as_bytes());
    let receipt: Value = serde_json::from_slice(&receipt.unwrap()).unwrap();
    assert_eq!(receipt["success"], true, "{receipt}");
    receipt["transaction"].as_str().unwrap().to_string()
}

async fn admin_json(gateway: &Gateway, path: &str) -> (StatusCode, Value) {
    let answer = get(&format!("http://{}{path}", gateway.admin.unwrap())).await;
    (answer.status, answer.json())
}

/// The `/readyz` state of the facilitator at `url`.
fn state_of<'a>(ready: &'a Value, url: &str) -> &'a Value {
    let all = ready["facilitators"].as_array().unwrap();
    all.iter().find(|f| f["name"] == url).unwrap_or_else(|| panic!("{url} in {ready}"))
}

#[tokio::test]
async fn two_facilitators_settle_every_call_once_even_when_one_dies_halfway() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::own().await else { return };
    let _mining = chain.keep_mining(Duration::from_secs(1));
    let mut first = Some(start_reference_facilitator_with_key(&node, &chain, &chain.facilitator_key));
    let second = start_reference_facilitator_with_key(&node, &chain, &chain.funded_key().await);
    let first_url = first.as_ref().unwrap().url.clone();
    let upstream = spawn_echo("api").await;
    let toml = gateway_toml(&upstream, &chain, &[(&first_url, 1), (&second.url, 1)]);
    let gateway = start_gateway(&toml.build()).await;

    let buyers: Vec<PrivateKeySigner> = (0..BUYERS).map(|_| PrivateKeySigner::random()).collect();
    for buyer in &buyers {
        chain.mint(buyer.address(), 2 * PRICE).await;
    }
    let payments = official_payments(&node, &payment_required(&gateway, "/report").await, &buyers, 2).await;
    let (before, after): (Vec<_>, Vec<_>) = payments.chunks(2).map(|pair| (pair[0].clone(), pair[1].clone())).unzip();

    let mut transactions = HashSet::new();
    for answer in pay_all(&gateway, "/report", before).await {
        transactions.insert(settled_transaction(&answer));
    }
    // One facilitator dies between the two halves: its calls go to the other one.
    drop(first.take());
    for answer in pay_all(&gateway, "/report", after).await {
        transactions.insert(settled_transaction(&answer));
    }

    assert_eq!(transactions.len(), 2 * BUYERS, "one transaction per payment");
    let payee = chain.balance(PAY_TO.parse().unwrap()).await;
    assert_eq!(payee, U256::from(2 * BUYERS as u64 * PRICE), "every payment moved exactly once");
    for buyer in &buyers {
        assert_eq!(chain.balance(buyer.address()).await, U256::ZERO, "both of its payments, once each");
    }
    let settled = gateway.pipeline.ledger().in_state(State::Settled).await.unwrap();
    assert_eq!(settled.len(), 2 * BUYERS);

    let (status, ready) = admin_json(&gateway, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "the other facilitator serves: {ready}");
    assert_eq!(state_of(&ready, &first_url)["healthy"], false, "{ready}");
    assert!(state_of(&ready, &first_url)["failovers"].as_u64().unwrap() > 0, "{ready}");
    assert_eq!(state_of(&ready, &second.url)["healthy"], true, "{ready}");
    let metrics = get(&format!("http://{}/metrics", gateway.admin.unwrap())).await.text();
    let healthy = |url: &str, value: u8| format!("x402_gateway_facilitator_healthy{{facilitator=\"{url}\"}} {value}");
    assert!(metrics.lines().any(|l| l == healthy(&first_url, 0)), "{metrics}");
    assert!(metrics.lines().any(|l| l == healthy(&second.url, 1)), "{metrics}");
    assert_eq!(get(&gateway.url("/free")).await.status, StatusCode::OK);
}

/// A real HTTP facilitator in front of `target`: answers `/settle` with `answer(n)` for the n-th settle
/// call (from 0) when it gives one, and otherwise passes the call on (a settlement's answer only after
/// `delay`). Counts the settles it received and those it passed on.
struct Front {
    server: Upstream,
    settles: Arc<AtomicUsize>,
    passed_on: Arc<AtomicUsize>,
}

async fn front(
    target: &str,
    delay: Duration,
    answer: impl Fn(usize) -> Option<(StatusCode, Value)> + Send + Sync + 'static,
) -> Front {
    let (settles, passed_on) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counted, passed, target, answer) = (settles.clone(), passed_on.clone(), target.to_string(), Arc::new(answer));
    let server = spawn_upstream(move |request: Request<hyper::body::Incoming>| {
        let (counted, passed, target, answer) = (counted.clone(), passed.clone(), target.clone(), answer.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let path = parts.uri.path().to_string();
            let own = if path == "/settle" { answer(counted.fetch_add(1, Ordering::SeqCst)) } else { None };
            let (status, body) = match own {
                Some((status, value)) => (status, Bytes::from(value.to_string())),
                None => {
                    if path == "/settle" {
                        passed.fetch_add(1, Ordering::SeqCst);
                    }
                    let forwarded = Request::builder()
                        .method(parts.method)
                        .uri(format!("{target}{path}"))
                        .header("content-type", "application/json")
                        .body(Full::new(body))
                        .unwrap();
                    let answer = send(&client(), forwarded).await;
                    if path == "/settle" {
                        tokio::time::sleep(delay).await;
                    }
                    (answer.status, answer.body)
                }
            };
            let mut response = http::Response::new(x402_gateway::proxy::body::full(body));
            *response.status_mut() = status;
            response.headers_mut().insert("content-type", "application/json".parse().unwrap());
            response
        }
    })
    .await;
    Front { server, settles, passed_on }
}

impl Front {
    fn url(&self) -> String {
        self.server.url()
    }

    fn settles(&self) -> usize {
        self.settles.load(Ordering::SeqCst)
    }

    fn passed_on(&self) -> usize {
        self.passed_on.load(Ordering::SeqCst)
    }
}

/// What the reference facilitator answers when its signer raced its own nonce (seen under load).
fn nonce_race() -> Value {
    json!({
        "success": false,
        "errorReason": "invalid_exact_evm_transaction_failed",
        "errorMessage": "Nonce provided for the transaction is lower than the current nonce of the account.\n\nDetails: nonce too low",
        "transaction": "",
        "network": "eip155:84532",
    })
}

async fn funded_buyer(chain: &Chain) -> PrivateKeySigner {
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), PRICE).await;
    buyer
}

async fn one_payment(node: &Node, gateway: &Gateway, path: &str, buyer: &PrivateKeySigner) -> String {
    let required = payment_required(gateway, path).await;
    official_payments(node, &required, std::slice::from_ref(buyer), 1).await.remove(0)
}

#[tokio::test]
async fn a_busy_facilitator_settles_the_payment_on_a_retry_once() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared().await else { return };
    let _mining = chain.keep_mining(Duration::from_secs(1));
    let reference: Facilitator = start_reference_facilitator_with_key(&node, &chain, &chain.facilitator_key);
    // Busy (503, no verdict) on the first settle, its signer's nonce race on the second, then the reference.
    let busy = front(&reference.url, Duration::ZERO, |n| match n {
        0 => Some((StatusCode::SERVICE_UNAVAILABLE, json!({ "error": "busy" }))),
        1 => Some((StatusCode::OK, nonce_race())),
        _ => None,
    })
    .await;
    let upstream = spawn_echo("api").await;
    // The one-facilitator form, as written before lists.
    let payment = Payment::usdc().facilitator(&busy.url());
    let gateway = start_gateway(&gateway_toml(&upstream, &chain, &[]).payment(payment).build()).await;
    let buyer = funded_buyer(&chain).await;
    let payee_before = chain.balance(PAY_TO.parse().unwrap()).await;

    let answer = pay(gateway.url("/report"), one_payment(&node, &gateway, "/report", &buyer).await).await;
    settled_transaction(&answer);
    assert_eq!((busy.settles(), busy.passed_on()), (3, 1), "two refusals before any broadcast, then one settlement");
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, payee_before + U256::from(PRICE));
    assert_eq!(chain.balance(buyer.address()).await, U256::ZERO);
    let (_, ready) = admin_json(&gateway, "/readyz").await;
    assert_eq!(state_of(&ready, &busy.url())["retries"], 2, "{ready}");
}

#[tokio::test]
async fn a_settlement_that_may_have_broadcast_is_never_sent_again_and_is_left_to_reconciliation() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared().await else { return };
    let _mining = chain.keep_mining(Duration::from_secs(1));
    let reference = start_reference_facilitator_with_key(&node, &chain, &chain.facilitator_key);
    // A transaction hash with `success: false`; the reference's settlement, answered after the gateway gave up.
    let hash = format!("0x{}", "ab".repeat(32));
    let failed_with_hash = {
        let hash = hash.clone();
        front(&reference.url, Duration::ZERO, move |_| {
            let answer = json!({ "success": false, "errorReason": "invalid_exact_evm_transaction_failed",
                                  "transaction": hash, "network": "eip155:84532" });
            Some((StatusCode::OK, answer))
        })
        .await
    };
    let late = front(&reference.url, Duration::from_secs(3), |_| None).await;
    // The other facilitator of each route: it must never see these settlements.
    let other = front(&reference.url, Duration::ZERO, |_| None).await;
    let upstream = spawn_echo("api").await;
    // Weighted so that each route's first choice is its front (the choice turns through the weights in order).
    let route = |path: &str, front: &Front| {
        Route::paid(path, "api", &PRICE.to_string())
            .set("facilitators", facilitator_list(&[(&front.url(), 1000), (&other.url(), 1)]))
    };
    let toml = GatewayToml::new()
        .listen()
        .upstream("api", &upstream.url())
        .payment(Payment::usdc().facilitator(&other.url()).set("facilitator_timeout_secs", 1))
        .route(route("/hashed", &failed_with_hash))
        .route(route("/late", &late))
        .network(chain.network());
    let gateway = start_gateway(&toml.build()).await;
    let (first_buyer, second_buyer) = (funded_buyer(&chain).await, funded_buyer(&chain).await);

    let hashed = pay(gateway.url("/hashed"), one_payment(&node, &gateway, "/hashed", &first_buyer).await).await;
    assert_eq!(hashed.status, StatusCode::PAYMENT_REQUIRED, "{}", hashed.text());
    let answered_late = pay(gateway.url("/late"), one_payment(&node, &gateway, "/late", &second_buyer).await).await;
    assert_eq!(answered_late.status, StatusCode::PAYMENT_REQUIRED, "{}", answered_late.text());
    assert_eq!(failed_with_hash.settles(), 1, "a failure with a transaction is not sent again");
    assert_eq!(late.settles(), 1, "a settlement without an answer in time is not sent again");
    assert_eq!(other.settles(), 0, "nor sent elsewhere");

    let open = gateway.pipeline.ledger().in_state(State::Settling).await.unwrap();
    assert_eq!(open.len(), 2, "both rows wait for reconciliation");
    assert!(open.iter().any(|row| row.transaction.as_deref() == Some(hash.as_str())), "the hash is recorded");
    // The chain decides: the late one settled, the other never happened.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = gateway.pipeline.reconcile(common::pay::now() + 1).await.unwrap();
    assert_eq!((report.settled, report.failed), (1, 1), "{report:?}");
    assert_eq!(chain.balance(second_buyer.address()).await, U256::ZERO);
    assert_eq!(chain.balance(first_buyer.address()).await, U256::from(PRICE));
}

#[tokio::test]
async fn with_no_facilitator_answering_paid_routes_get_503_and_free_routes_are_served() {
    // Ports nothing listens on (bound, then closed).
    let closed = || {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        format!("http://127.0.0.1:{port}")
    };
    let (first, second) = (closed(), closed());
    let toml = GatewayToml::new()
        .listen()
        .admin()
        .upstream("api", &spawn_echo("api").await.url())
        .payment(Payment::usdc().set("facilitators", facilitator_list(&[(&first, 1), (&second, 1)])))
        .route(Route::paid("/report", "api", &PRICE.to_string()))
        .route(Route::free("/free", "api"));
    let gateway = start_gateway(&toml.build()).await;
    let challenge = common::pay::decode_header(&get(&gateway.url("/report")).await.headers["payment-required"]);
    let buyer = PrivateKeySigner::random();
    let offer = &challenge["accepts"][0];
    let signed = common::pay::Authorization::for_offer(buyer.address(), offer).sign(&buyer);
    let answer = pay(gateway.url("/report"), common::pay::v2_header(&challenge["resource"], offer, signed)).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.text());
    assert_eq!(answer.json()["error"], "facilitator_unavailable");
    assert_eq!(get(&gateway.url("/free")).await.status, StatusCode::OK);
    let (status, ready) = admin_json(&gateway, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    for url in [&first, &second] {
        assert_eq!(state_of(&ready, url)["healthy"], false, "{ready}");
    }
}
