//! Interoperability with the official x402 clients (`@x402/fetch` v2, `x402-fetch` v1) and the reference
//! facilitator (`@x402/core` + `@x402/evm`), pinned in `tests/interop/package.json` and installed by
//! `scripts/test.sh`. Everything runs on loopback against a local anvil chain.

mod common;

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use common::chain::Chain;
use common::config::{GatewayToml, Payment, Route};
use common::facilitator::start_reference_facilitator;
use common::tools::{require_node, Node};
use common::*;
use serde_json::Value;

const PRICE: u64 = 1000;

/// Runs `pay.mjs` (an official client) against `url` with `buyer`'s key; returns its JSON report.
async fn official_client_pays(node: &Node, url: String, client: &'static str, buyer: &PrivateKeySigner) -> Value {
    let mut command = node.script("pay.mjs");
    command
        .args(["--url", &url, "--client", client, "--key-env", "X402_TEST_BUYER_KEY"])
        .env("X402_TEST_BUYER_KEY", alloy::hex::encode_prefixed(buyer.to_bytes()));
    let output = tokio::task::spawn_blocking(move || command.output().expect("node runs")).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pay.mjs --client {client} failed (run scripts/test.sh to install the clients): {stderr}"
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("pay.mjs printed no JSON ({e}); stderr: {stderr}"))
}

/// `/report` at `PRICE`, settled by `facilitator` (`"local"` or a URL) on `chain`.
fn paid_toml(upstream: &Upstream, chain: &Chain, facilitator: &str) -> GatewayToml {
    let report = Route::paid("/report", "api", &PRICE.to_string())
        .set("description", "A paid report")
        .set("mime_type", "application/json");
    GatewayToml::new()
        .listen()
        .upstream("api", &upstream.url())
        .payment(Payment::usdc().facilitator(facilitator))
        .route(report)
        .network(chain.network())
}

async fn assert_paid(report: &Value, header: &str, chain: &Chain, buyer: Address, payee_before: U256) {
    assert_eq!(report["status"], 200, "{report}");
    let body: Value = serde_json::from_str(report["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["upstream"], "api", "the client got the upstream's answer");
    assert_eq!(report["header"], header, "{report}");
    let settlement = &report["settlement"];
    assert_eq!(settlement["success"], true, "{report}");
    assert!(settlement["transaction"].as_str().is_some_and(|t| t.len() == 66), "{report}");
    assert_eq!(chain.balance(buyer).await, U256::from(5 * PRICE - PRICE));
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, payee_before + U256::from(PRICE));
}

#[tokio::test]
async fn the_official_v2_client_pays_and_decodes_the_receipt() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared().await else { return };
    let gateway = start_gateway(&paid_toml(&spawn_echo("api").await, &chain, "local").build()).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 5 * PRICE).await;
    let report = official_client_pays(&node, gateway.url("/report"), "v2", &buyer).await;
    assert_paid(&report, "payment-response", &chain, buyer.address(), U256::ZERO).await;
    assert_eq!(report["settlement"]["network"], "eip155:84532");
}

#[tokio::test]
async fn the_official_v1_client_pays_and_decodes_the_receipt() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared().await else { return };
    let gateway = start_gateway(&paid_toml(&spawn_echo("api").await, &chain, "local").build()).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 5 * PRICE).await;
    let report = official_client_pays(&node, gateway.url("/report"), "v1", &buyer).await;
    assert_paid(&report, "x-payment-response", &chain, buyer.address(), U256::ZERO).await;
    assert_eq!(report["settlement"]["network"], "base-sepolia");
}

#[tokio::test]
async fn the_gateway_settles_through_the_reference_facilitator() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared().await else { return };
    let facilitator = start_reference_facilitator(&node, &chain, 0);
    let gateway = start_gateway(&paid_toml(&spawn_echo("api").await, &chain, &facilitator.url).build()).await;

    let v2_buyer = PrivateKeySigner::random();
    chain.mint(v2_buyer.address(), 5 * PRICE).await;
    let report = official_client_pays(&node, gateway.url("/report"), "v2", &v2_buyer).await;
    assert_paid(&report, "payment-response", &chain, v2_buyer.address(), U256::ZERO).await;

    let v1_buyer = PrivateKeySigner::random();
    chain.mint(v1_buyer.address(), 5 * PRICE).await;
    let report = official_client_pays(&node, gateway.url("/report"), "v1", &v1_buyer).await;
    assert_paid(&report, "x-payment-response", &chain, v1_buyer.address(), U256::from(PRICE)).await;

    // A payer the facilitator refuses: its reason reaches the buyer in a fresh challenge.
    let broke = PrivateKeySigner::random();
    let report = official_client_pays(&node, gateway.url("/report"), "v2", &broke).await;
    assert_eq!(report["status"], 402, "{report}");
    assert_eq!(report["paymentRequired"]["error"], "invalid_exact_evm_insufficient_balance", "{report}");
}

#[tokio::test]
async fn routes_a_facilitator_cannot_serve_are_reported_at_start() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared().await else { return };
    let facilitator = start_reference_facilitator(&node, &chain, 0);
    let toml = paid_toml(&spawn_echo("api").await, &chain, &facilitator.url)
        // A mainnet payee must not be a development account (whose key is published).
        .route(
            Route::paid("/mainnet", "api", "1000")
                .set("network", "eip155:8453")
                .set("pay_to", "0x1111111111111111111111111111111111111111"),
        )
        .route(Route::paid("/elsewhere", "api", "1000").facilitator("http://127.0.0.1:9"));
    let gateway = start_gateway(&toml.build()).await;
    let warnings = gateway.pipeline.facilitator_warnings().await;
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    let has = |needle: &str| warnings.iter().any(|w| w.contains(needle));
    assert!(has("does not list exact payments on eip155:8453 (route /mainnet)"), "{warnings:?}");
    assert!(has("http://127.0.0.1:9 cannot be asked"), "{warnings:?}");
}

#[tokio::test]
async fn facilitator_auth_reaches_the_facilitator_on_every_call() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared().await else { return };
    let facilitator = start_reference_facilitator(&node, &chain, 0);
    // A recording front for the real facilitator: notes each call's path and Authorization, then forwards it.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (record, target) = (seen.clone(), facilitator.url.clone());
    let front = spawn_upstream(move |request: http::Request<hyper::body::Incoming>| {
        let (record, target) = (record.clone(), target.clone());
        async move {
            use http_body_util::BodyExt;
            let (parts, body) = request.into_parts();
            let auth = parts.headers.get("authorization").map(|v| v.to_str().unwrap_or("").to_string());
            record.lock().unwrap().push((parts.uri.path().to_string(), auth));
            let body = body.collect().await.unwrap().to_bytes();
            let forwarded = http::Request::builder()
                .method(parts.method)
                .uri(format!("{target}{}", parts.uri.path()))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(body))
                .unwrap();
            let answer = send(&client(), forwarded).await;
            let mut response = http::Response::new(x402_gateway::proxy::body::full(answer.body));
            *response.status_mut() = answer.status;
            response
        }
    })
    .await;
    let authorized = Payment::usdc().facilitator(&front.url()).set("facilitator_auth", "Bearer ${T_FACILITATOR_TOKEN}");
    let toml = paid_toml(&spawn_echo("api").await, &chain, &front.url()).payment(authorized);
    let gateway = start_gateway_with_env(&toml.build(), &[("T_FACILITATOR_TOKEN", "t0ken")]).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 5 * PRICE).await;
    let report = official_client_pays(&node, gateway.url("/report"), "v2", &buyer).await;
    assert_paid(&report, "payment-response", &chain, buyer.address(), U256::ZERO).await;
    let calls = seen.lock().unwrap().clone();
    let paths: Vec<&str> = calls.iter().map(|(p, _)| p.as_str()).collect();
    assert!(paths.contains(&"/verify") && paths.contains(&"/settle"), "{calls:?}");
    assert!(calls.iter().all(|(_, auth)| auth.as_deref() == Some("Bearer t0ken")), "{calls:?}");
}

#[tokio::test]
async fn a_facilitator_outage_is_a_503_for_paid_routes_only_and_recovery_is_automatic() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared().await else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let toml = paid_toml(&spawn_echo("api").await, &chain, &format!("http://127.0.0.1:{port}"))
        .route(Route::free("/free", "api"));
    let gateway = start_gateway(&toml.build()).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 5 * PRICE).await;
    let challenge = common::pay::decode_header(&get(&gateway.url("/report")).await.headers["payment-required"]);
    let offer = &challenge["accepts"][0];
    let header = common::pay::v2_header(
        &challenge["resource"],
        offer,
        common::pay::Authorization::for_offer(buyer.address(), offer).sign(&buyer),
    );
    let pay = || async {
        let request = http::Request::get(gateway.url("/report")).header("payment-signature", &header);
        send(&client(), request.body(http_body_util::Full::default()).unwrap()).await
    };

    let down = pay().await;
    assert_eq!(down.status, http::StatusCode::SERVICE_UNAVAILABLE, "{}", down.text());
    assert_eq!(down.json()["error"], "facilitator_unavailable");
    assert_eq!(get(&gateway.url("/free")).await.status, http::StatusCode::OK, "free routes keep working");

    // The facilitator comes back on its address: the same authorization now pays, nothing restarted.
    let _facilitator = start_reference_facilitator(&node, &chain, port);
    let up = pay().await;
    assert_eq!(up.status, http::StatusCode::OK, "{}", up.text());
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, U256::from(PRICE));
}
