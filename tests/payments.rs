//! The payment gate: 402 challenges (v1 + v2), exact-EVM verification of real alloy signatures, replay
//! protection, and that nothing unpaid or badly paid reaches the upstream.

mod common;

use alloy::primitives::{address, Address, U256};
use alloy::signers::local::PrivateKeySigner;
use base64::Engine;
use common::chain::Chain;
use common::config::{toml_value, GatewayToml, Payment, Route};
use common::pay::{self, Authorization};
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

const OTHER_PAY_TO: &str = "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65";

fn paid_toml(upstream: &Upstream, chain: &Chain) -> String {
    let accepts = format!(r#"[{{ pay_to = "{PAY_TO}" }}, {{ pay_to = "{OTHER_PAY_TO}", max_timeout_seconds = 60 }}]"#);
    GatewayToml::new()
        .listen()
        .upstream("api", &upstream.url())
        .payment(Payment::usdc())
        .route(
            Route::priced("/weather", "api", "$0.001")
                .methods(&["GET", "HEAD"])
                .set("description", "Current weather")
                .set("mime_type", "application/json"),
        )
        .route(Route::paid("/multi", "api", "2500").set("accepts", toml_value(&accepts)))
        .route(Route::free("/free", "api"))
        .network(chain.network())
        .build()
}

struct Setup {
    upstream: Upstream,
    gateway: Gateway,
    buyer: PrivateKeySigner,
    chain: Chain,
}

/// A gateway selling routes priced in TestUSDC on a local chain, and a buyer holding 10 of it; `None` when the
/// test skips for want of anvil.
async fn setup() -> Option<Setup> {
    let chain = Chain::shared().await?;
    let upstream = spawn_echo("api").await;
    let gateway = start_gateway(&paid_toml(&upstream, &chain)).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 10_000_000).await;
    Some(Setup { upstream, gateway, buyer, chain })
}

impl Setup {
    /// The decoded `PAYMENT-REQUIRED` of an unpaid call.
    async fn challenge(&self, path: &str) -> Value {
        let answer = get(&self.gateway.url(path)).await;
        assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
        pay::decode_header(&answer.headers["payment-required"])
    }

    async fn offer(&self, path: &str) -> (Value, Value) {
        let challenge = self.challenge(path).await;
        (challenge["resource"].clone(), challenge["accepts"][0].clone())
    }

    async fn call(&self, path: &str, header: &str, value: &str) -> Answer {
        let request = Request::get(self.gateway.url(path)).header(header, value).body(Full::default()).unwrap();
        send(&client(), request).await
    }

    async fn pay_v2(&self, path: &str, tamper: impl FnOnce(&mut Authorization, &mut Value)) -> Answer {
        let (resource, mut accepted) = self.offer(path).await;
        let mut authorization = Authorization::for_offer(self.buyer.address(), &accepted);
        tamper(&mut authorization, &mut accepted);
        let header = pay::v2_header(&resource, &accepted, authorization.sign(&self.buyer));
        self.call(path, "payment-signature", &header).await
    }
}

/// Asserts a refusal: 402 with `reason` in both the v2 header and the v1 body, and no upstream call.
fn assert_refused(answer: &Answer, reason: &str, setup: &Setup) {
    assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED, "{}", answer.text());
    assert_eq!(pay::decode_header(&answer.headers["payment-required"])["error"], reason);
    assert_eq!(answer.json()["error"], reason);
    assert_eq!(setup.upstream.hits(), 0, "a refused payment reached the upstream");
}

#[tokio::test]
async fn challenge_carries_v2_header_and_v1_body() {
    let Some(s) = setup().await else { return };
    let answer = get(&s.gateway.url("/weather?city=Paris")).await;
    assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(answer.headers["content-type"], "application/json");
    let exposed = answer.headers["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("PAYMENT-REQUIRED") && exposed.contains("PAYMENT-RESPONSE"), "{exposed}");

    let raw_header = answer.headers["payment-required"].to_str().unwrap();
    assert_eq!(raw_header.len() % 4, 0, "padded standard base64");
    let v2 = pay::decode_header(&answer.headers["payment-required"]);
    let url = s.gateway.url("/weather?city=Paris");
    assert_eq!(
        v2,
        json!({
            "x402Version": 2,
            "error": "Payment required",
            "resource": { "url": url, "description": "Current weather", "mimeType": "application/json" },
            "accepts": [{
                "scheme": "exact", "network": "eip155:84532", "amount": "1000", "asset": s.chain.token.to_string(),
                "payTo": PAY_TO, "maxTimeoutSeconds": 300, "extra": { "name": "USD Coin", "version": "2" }
            }],
            "extensions": {
                "payment-identifier": {
                    "info": { "required": false },
                    "schema": {
                        "$schema": "https://json-schema.org/draft/2020-12/schema",
                        "type": "object",
                        "properties": {
                            "required": { "type": "boolean" },
                            "id": { "type": "string", "minLength": 16, "maxLength": 128, "pattern": "^[a-zA-Z0-9_-]+$" }
                        },
                        "required": ["required"]
                    }
                }
            }
        })
    );
    assert_eq!(
        answer.json(),
        json!({
            "x402Version": 1,
            "error": "PAYMENT-SIGNATURE (x402 v2) or X-PAYMENT (x402 v1) header is required",
            "accepts": [{
                "scheme": "exact", "network": "base-sepolia", "maxAmountRequired": "1000", "resource": url,
                "description": "Current weather", "mimeType": "application/json", "payTo": PAY_TO,
                "maxTimeoutSeconds": 300, "asset": s.chain.token.to_string(), "extra": { "name": "USD Coin", "version": "2" }
            }]
        })
    );
    let again = get(&s.gateway.url("/weather?city=Paris")).await;
    assert_eq!(again.headers["payment-required"], answer.headers["payment-required"], "deterministic offers");
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test]
async fn several_offers_in_configured_order() {
    let Some(s) = setup().await else { return };
    let challenge = s.challenge("/multi").await;
    let accepts = challenge["accepts"].as_array().unwrap();
    assert_eq!(accepts.len(), 2);
    assert_eq!(accepts[0]["payTo"], PAY_TO);
    assert_eq!(accepts[0]["maxTimeoutSeconds"], 300);
    assert_eq!(accepts[1]["payTo"], OTHER_PAY_TO);
    assert_eq!(accepts[1]["maxTimeoutSeconds"], 60);
    assert!(accepts.iter().all(|a| a["amount"] == "2500"));
    // Paying the second offer works.
    let resource = challenge["resource"].clone();
    let auth = Authorization::for_offer(s.buyer.address(), &accepts[1]);
    let answer =
        s.call("/multi", "payment-signature", &pay::v2_header(&resource, &accepts[1], auth.sign(&s.buyer))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(s.upstream.hits(), 1);
    assert_eq!(
        s.chain.balance(OTHER_PAY_TO.parse().unwrap()).await,
        U256::from(2500),
        "the second offer's payee was paid"
    );
}

#[tokio::test]
async fn browser_gets_an_html_page_and_preflight_and_head_are_free() {
    let Some(s) = setup().await else { return };
    let browser = Request::get(s.gateway.url("/weather"))
        .header("accept", "text/html,application/xhtml+xml")
        .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64)")
        .body(Full::default())
        .unwrap();
    let page = send(&client(), browser).await;
    assert_eq!(page.status, StatusCode::PAYMENT_REQUIRED);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text();
    assert!(html.contains("0.001 USDC") && html.contains("Current weather") && html.contains(PAY_TO), "{html}");

    let preflight = Request::options(s.gateway.url("/weather"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "payment-signature")
        .body(Full::default())
        .unwrap();
    let preflight = send(&client(), preflight).await;
    assert_eq!(preflight.status, StatusCode::NO_CONTENT);
    assert_eq!(preflight.headers["access-control-allow-headers"], "payment-signature");
    assert_eq!(preflight.headers["access-control-allow-origin"], "*");

    let head = send(&client(), Request::head(s.gateway.url("/weather")).body(Full::default()).unwrap()).await;
    assert_eq!(head.status, StatusCode::PAYMENT_REQUIRED);
    assert!(head.headers.contains_key("payment-required"));
    assert!(head.body.is_empty());
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test]
async fn valid_v2_payment_reaches_the_upstream_without_payment_headers() {
    let Some(s) = setup().await else { return };
    let answer = s.pay_v2("/weather", |_, _| {}).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let echo = answer.json();
    assert_eq!(echo["path"], "/weather");
    assert!(echo["headers"].get("payment-signature").is_none(), "the buyer's payment leaked upstream");
    assert_eq!(s.upstream.hits(), 1);
}

#[tokio::test]
async fn valid_v1_payment_reaches_the_upstream_without_payment_headers() {
    let Some(s) = setup().await else { return };
    let body = get(&s.gateway.url("/weather")).await.json();
    let v1_offer = &body["accepts"][0];
    // A v1 client signs from the v1 offer: same terms, v1 network name.
    let mut as_v2 = v1_offer.clone();
    as_v2["network"] = json!("eip155:84532");
    as_v2["amount"] = v1_offer["maxAmountRequired"].clone();
    let auth = Authorization::for_offer(s.buyer.address(), &as_v2);
    let answer = s.call("/weather", "x-payment", &pay::v1_header("base-sepolia", auth.sign(&s.buyer))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(answer.json()["headers"].get("x-payment").is_none());
    assert_eq!(s.upstream.hits(), 1);
}

#[tokio::test]
async fn tampered_value_is_refused() {
    let Some(s) = setup().await else { return };
    let (resource, accepted) = s.offer("/weather").await;
    let auth = Authorization::for_offer(s.buyer.address(), &accepted);
    let mut payload = auth.sign(&s.buyer);
    payload["authorization"]["value"] = json!("1");
    let answer = s.call("/weather", "payment-signature", &pay::v2_header(&resource, &accepted, payload)).await;
    assert_refused(&answer, "invalid_exact_evm_signature", &s);
}

#[tokio::test]
async fn wrong_amounts_are_refused() {
    let Some(s) = setup().await else { return };
    let under = s.pay_v2("/weather", |a, _| a.message.value = U256::from(999)).await;
    assert_refused(&under, "invalid_exact_evm_authorization_value", &s);
    let over = s.pay_v2("/weather", |a, _| a.message.value = U256::from(1001)).await;
    assert_refused(&over, "invalid_exact_evm_authorization_value", &s);
    // Claiming a cheaper offer than the route's is no offer at all.
    let cheap = s.pay_v2("/weather", |a, accepted| {
        a.message.value = U256::from(1);
        accepted["amount"] = json!("1");
    });
    assert_refused(&cheap.await, "invalid_payment_requirements", &s);
}

#[tokio::test]
async fn wrong_payee_asset_or_chain_are_refused() {
    let Some(s) = setup().await else { return };
    let thief = address!("00000000000000000000000000000000000000aa");
    let payee = s.pay_v2("/weather", |a, _| a.message.to = thief).await;
    assert_refused(&payee, "invalid_exact_evm_recipient_mismatch", &s);
    // Signed for another token or chain: the signature does not hold under this offer's EIP-712 domain.
    let asset = s.pay_v2("/weather", |a, _| a.token = address!("833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")).await;
    assert_refused(&asset, "invalid_exact_evm_signature", &s);
    let chain = s.pay_v2("/weather", |a, _| a.chain_id = 8453).await;
    assert_refused(&chain, "invalid_exact_evm_signature", &s);
    let claimed_asset = s.pay_v2("/weather", |_, accepted| accepted["asset"] = json!(Address::ZERO.to_string())).await;
    assert_refused(&claimed_asset, "invalid_payment_requirements", &s);
}

#[tokio::test]
async fn time_window_is_enforced() {
    let Some(s) = setup().await else { return };
    let now = pay::now();
    let expired = s.pay_v2("/weather", |a, _| a.message.validBefore = U256::from(now - 10)).await;
    assert_refused(&expired, "invalid_exact_evm_payload_authorization_valid_before", &s);
    let too_short = s.pay_v2("/weather", |a, _| a.message.validBefore = U256::from(now + 2)).await;
    assert_refused(&too_short, "invalid_exact_evm_payload_authorization_valid_before", &s);
    let too_long = s.pay_v2("/weather", |a, _| a.message.validBefore = U256::from(now + 86_400 * 365)).await;
    assert_refused(&too_long, "invalid_exact_evm_payload_authorization_valid_before", &s);
    let early = s.pay_v2("/weather", |a, _| a.message.validAfter = U256::from(now + 600)).await;
    assert_refused(&early, "invalid_exact_evm_payload_authorization_valid_after", &s);
}

#[tokio::test]
async fn bad_signatures_are_refused() {
    let Some(s) = setup().await else { return };
    let (resource, accepted) = s.offer("/weather").await;
    let auth = Authorization::for_offer(s.buyer.address(), &accepted);
    let by_other_key = auth.sign(&PrivateKeySigner::random());
    let answer = s.call("/weather", "payment-signature", &pay::v2_header(&resource, &accepted, by_other_key)).await;
    assert_refused(&answer, "invalid_exact_evm_signature", &s);
    for garbage in ["0x1234", "0x", "not hex", &format!("0x{}", "00".repeat(65)), &format!("0x{}", "zz".repeat(65))] {
        let payload = auth.payload_with_signature(garbage);
        let answer = s.call("/weather", "payment-signature", &pay::v2_header(&resource, &accepted, payload)).await;
        assert_refused(&answer, "invalid_exact_evm_signature", &s);
    }
}

#[tokio::test]
async fn unknown_scheme_network_and_version_are_refused() {
    let Some(s) = setup().await else { return };
    let scheme = s.pay_v2("/weather", |_, accepted| accepted["scheme"] = json!("upto")).await;
    assert_refused(&scheme, "unsupported_scheme", &s);
    let network = s.pay_v2("/weather", |a, accepted| {
        a.chain_id = 1;
        accepted["network"] = json!("eip155:1");
    });
    assert_refused(&network.await, "invalid_network", &s);
    let (_, accepted) = s.offer("/weather").await;
    let auth = Authorization::for_offer(s.buyer.address(), &accepted);
    let v1_unknown = s.call("/weather", "x-payment", &pay::v1_header("solana-devnet", auth.sign(&s.buyer))).await;
    assert_refused(&v1_unknown, "invalid_network", &s);
    let v3 = s.call("/weather", "payment-signature", &pay::encode(&json!({ "x402Version": 3 }))).await;
    assert_refused(&v3, "invalid_x402_version", &s);
}

#[tokio::test]
async fn malformed_headers_are_400() {
    let Some(s) = setup().await else { return };
    let (resource, accepted) = s.offer("/weather").await;
    let auth = Authorization::for_offer(s.buyer.address(), &accepted);
    let mut bad_nonce = auth.sign(&s.buyer);
    bad_nonce["authorization"]["nonce"] = json!("0x1234");
    let oversized = pay::v2_header(&resource, &accepted, json!({ "padding": "x".repeat(10_000) }));
    for (what, value) in [
        ("not base64", "%%%not-base64%%%".to_string()),
        ("url-safe base64", "eyJ4NDAyVmVyc2lvbiI6Mn0_-w".to_string()),
        ("not JSON", base64::engine::general_purpose::STANDARD.encode("{not json")),
        ("JSON but no version", pay::encode(&json!("just a string"))),
        ("wrong shape", pay::encode(&json!({ "x402Version": 2, "accepted": 5 }))),
        ("bad nonce", pay::v2_header(&resource, &accepted, bad_nonce)),
        ("oversized", oversized),
    ] {
        let answer = s.call("/weather", "payment-signature", &value).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{what}: {}", answer.text());
        assert_eq!(answer.json()["error"], "invalid_payload", "{what}");
    }
    assert_eq!(s.upstream.hits(), 0);
    // The refused attempts reserved nothing: the same authorization, sent well-formed, still pays.
    let good = pay::v2_header(&resource, &accepted, auth.sign(&s.buyer));
    assert_eq!(s.call("/weather", "payment-signature", &good).await.status, StatusCode::OK);
}

#[tokio::test]
async fn one_authorization_pays_for_one_call_even_concurrently() {
    let Some(s) = setup().await else { return };
    let (resource, accepted) = s.offer("/weather").await;
    let auth = Authorization::for_offer(s.buyer.address(), &accepted);
    let header = pay::v2_header(&resource, &accepted, auth.sign(&s.buyer));
    let calls = (0..50).map(|_| {
        let (url, header) = (s.gateway.url("/weather"), header.clone());
        tokio::spawn(async move {
            let request = Request::get(url).header("payment-signature", header).body(Full::default()).unwrap();
            send(&client(), request).await
        })
    });
    // Exactly one call reaches the upstream and is charged. The others are refused while it is in flight,
    // or, once it has settled, get its answer again (an idempotent retry, marked as a replay).
    let mut answers = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        answers.push(call.await.unwrap());
    }
    let originals: Vec<&Answer> =
        answers.iter().filter(|a| a.status == StatusCode::OK && !a.headers.contains_key("x402-replayed")).collect();
    assert_eq!(originals.len(), 1);
    for answer in &answers {
        match answer.status {
            StatusCode::OK => assert_eq!(answer.body, originals[0].body),
            StatusCode::PAYMENT_REQUIRED => assert_eq!(answer.json()["error"], "invalid_exact_evm_nonce_already_used"),
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    assert_eq!(s.upstream.hits(), 1);
    // And later, sequentially, it is still the one paid answer, not a second charge.
    let later = s.call("/weather", "payment-signature", &header).await;
    assert_eq!(later.status, StatusCode::OK);
    assert_eq!(later.headers["x402-replayed"], "true");
    assert_eq!(s.upstream.hits(), 1);
    assert_eq!(s.chain.balance(PAY_TO.parse().unwrap()).await, U256::from(1000), "one transfer");
}

#[tokio::test]
async fn free_routes_ignore_payments_and_never_forward_them() {
    let Some(s) = setup().await else { return };
    let request = Request::get(s.gateway.url("/free"))
        .header("payment-signature", "anything")
        .header("x-payment", "anything")
        .body(Full::default())
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::OK);
    let headers = &answer.json()["headers"];
    assert!(headers.get("payment-signature").is_none() && headers.get("x-payment").is_none());
}
