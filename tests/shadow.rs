//! Shadow mode (`mode = "shadow"`), for a seller's rollout: a paid route serves every call free, offers its
//! price on the answer, and verifies and counts the payments sent anyway without ever settling one.

mod common;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use common::chain::Chain;
use common::config::{GatewayToml, Payment, Route};
use common::pay::{self, Authorization};
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use std::collections::HashMap;

const PRICE: u64 = 1000;

/// A gateway on `chain` settling in-process, with `[payment]` in `global` mode (the default when `None`) and
/// the paid routes `routes`, each with its own mode when given.
fn toml(upstream: &Upstream, chain: &Chain, global: Option<&str>, routes: &[(&str, Option<&str>)]) -> String {
    let mut payment = Payment::usdc().facilitator("local");
    if let Some(mode) = global {
        payment = payment.set("mode", mode);
    }
    let mut toml = GatewayToml::new().listen().admin().upstream("api", &upstream.url()).payment(payment);
    for (path, mode) in routes {
        let route = Route::paid(path, "api", &PRICE.to_string());
        toml = toml.route(match mode {
            Some(mode) => route.set("mode", *mode),
            None => route,
        });
    }
    toml.network(chain.network()).build()
}

async fn pay(gateway: &Gateway, path: &str, header: &str) -> Answer {
    let request = Request::get(gateway.url(path)).header("payment-signature", header).body(Full::default()).unwrap();
    send(&client(), request).await
}

/// The offer of a route, read from the `PAYMENT-REQUIRED` of an unpaid call (a 200 in shadow mode, a 402
/// otherwise): its resource and first `accepts` entry.
async fn offer(gateway: &Gateway, path: &str) -> (Value, Value) {
    let challenge = pay::decode_header(&get(&gateway.url(path)).await.headers["payment-required"]);
    (challenge["resource"].clone(), challenge["accepts"][0].clone())
}

/// A signed payment for `path` from `buyer`.
async fn signed(gateway: &Gateway, path: &str, buyer: &PrivateKeySigner) -> String {
    let (resource, accepted) = offer(gateway, path).await;
    pay::v2_header(&resource, &accepted, Authorization::for_offer(buyer.address(), &accepted).sign(buyer))
}

async fn metrics(gateway: &Gateway) -> HashMap<String, f64> {
    let text = get(&format!("http://{}/metrics", gateway.admin.expect("admin listener"))).await.text();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(name, value)| value.parse().ok().map(|v| (name.to_string(), v)))
        .collect()
}

fn shadow_series(metrics: &HashMap<String, f64>) -> Vec<(&str, f64)> {
    let mut series: Vec<(&str, f64)> =
        metrics.iter().filter(|(k, _)| k.starts_with("x402_gateway_shadow_")).map(|(k, v)| (k.as_str(), *v)).collect();
    series.sort_by(|a, b| a.0.cmp(b.0));
    series
}

/// The headers the upstream received, from the echo's answer.
fn forwarded_headers(answer: &Answer) -> Value {
    answer.json()["headers"].clone()
}

#[tokio::test]
async fn an_unpaid_call_is_served_free_with_the_offer() {
    let Some(chain) = Chain::shared().await else { return };
    let upstream = spawn_echo("api").await;
    let gateway = start_gateway(&toml(&upstream, &chain, Some("shadow"), &[("/paid", None)])).await;

    let answer = get(&gateway.url("/paid")).await;

    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(upstream.hits(), 1, "the upstream served it");
    assert_eq!(answer.json()["upstream"], "api");
    let challenge = pay::decode_header(&answer.headers["payment-required"]);
    assert_eq!(challenge["x402Version"], 2);
    assert_eq!(challenge["accepts"][0]["amount"], PRICE.to_string());
    assert_eq!(challenge["accepts"][0]["payTo"], PAY_TO);
    assert!(challenge["resource"]["url"].as_str().unwrap().ends_with("/paid"), "{challenge}");
    assert!(answer.headers.get("payment-response").is_none(), "nothing was settled");
    assert!(gateway.pipeline.ledger().list(None, None, None, 10).await.unwrap().is_empty());
    assert!(shadow_series(&metrics(&gateway).await).is_empty(), "no payment, nothing to count");
}

#[tokio::test]
async fn a_valid_payment_is_verified_and_counted_and_never_settled() {
    let logs = common::logs::captured();
    let Some(chain) = Chain::shared().await else { return };
    let upstream = spawn_echo("api").await;
    let gateway = start_gateway(&toml(&upstream, &chain, Some("shadow"), &[("/paid", None)])).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), PRICE).await;
    let payee_before = chain.balance(PAY_TO.parse().unwrap()).await;

    let header = signed(&gateway, "/paid", &buyer).await;
    let answer = pay(&gateway, "/paid", &header).await;

    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let forwarded = forwarded_headers(&answer);
    assert!(forwarded.get("payment-signature").is_none(), "the payment is for the gateway alone: {forwarded}");
    assert!(answer.headers.get("payment-response").is_none(), "no receipt: nothing was settled");
    assert!(answer.headers.get("payment-required").is_none(), "a buyer whose payment is good needs no offer");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(PRICE), "the buyer kept its money");
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, payee_before, "the payee got nothing");
    assert!(gateway.pipeline.ledger().list(None, None, None, 10).await.unwrap().is_empty(), "no charge recorded");
    let token = chain.token.to_string();
    assert_eq!(
        shadow_series(&metrics(&gateway).await),
        [
            ("x402_gateway_shadow_payments_total{route=\"/paid\",outcome=\"valid\"}", 1.0),
            (
                &*format!(
                    "x402_gateway_shadow_revenue_atomic_total{{route=\"/paid\",network=\"eip155:84532\",asset=\"{token}\"}}"
                ),
                PRICE as f64
            ),
        ]
    );
    let log = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&buyer.address().to_string())).collect();
    assert_eq!(lines.len(), 1, "one line for the would-be charge: {log}");
    for field in
        ["INFO", "would have been charged", "route=\"/paid\"", &format!("amount={PRICE}"), "network=eip155:84532"]
    {
        assert!(lines[0].contains(field), "{field} missing: {}", lines[0]);
    }
    // Nothing was reserved: the same authorization is still the buyer's to spend on an enforced route.
    let enforced = start_gateway(&toml(&upstream, &chain, None, &[("/paid", None)])).await;
    let paid = pay(&enforced, "/paid", &header).await;
    assert_eq!(paid.status, StatusCode::OK, "{}", paid.text());
    assert_eq!(chain.balance(buyer.address()).await, U256::ZERO);
}

#[tokio::test]
async fn invalid_payments_are_served_and_counted_with_their_reason() {
    let Some(chain) = Chain::shared().await else { return };
    let upstream = spawn_echo("api").await;
    let gateway = start_gateway(&toml(&upstream, &chain, Some("shadow"), &[("/paid", None)])).await;
    let (resource, accepted) = offer(&gateway, "/paid").await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), PRICE).await;
    // Signed by another key than the payer's: the signature does not recover `from`.
    let forged = Authorization::for_offer(buyer.address(), &accepted).sign(&PrivateKeySigner::random());
    let unfunded = PrivateKeySigner::random();
    let broke = Authorization::for_offer(unfunded.address(), &accepted).sign(&unfunded);
    let payee_before = chain.balance(PAY_TO.parse().unwrap()).await;

    let answers = [
        pay(&gateway, "/paid", &pay::v2_header(&resource, &accepted, forged)).await,
        pay(&gateway, "/paid", &pay::v2_header(&resource, &accepted, broke)).await,
        pay(&gateway, "/paid", "%%%").await,
    ];

    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK, "shadow mode never refuses: {}", answer.text());
        assert!(forwarded_headers(answer).get("payment-signature").is_none());
    }
    assert_eq!(upstream.hits(), 4, "the offer's call and the three paid ones");
    let told = |answer: &Answer| pay::decode_header(&answer.headers["payment-required"])["error"].clone();
    assert_eq!(told(&answers[0]), "invalid_exact_evm_signature", "the offer says what is wrong");
    assert_eq!(told(&answers[1]), "invalid_exact_evm_insufficient_balance", "verified on chain, too");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(PRICE));
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, payee_before);
    assert!(gateway.pipeline.ledger().list(None, None, None, 10).await.unwrap().is_empty());
    let invalid = |reason: &str| {
        format!("x402_gateway_shadow_payments_total{{route=\"/paid\",outcome=\"invalid\",reason=\"{reason}\"}}")
    };
    let expected = [
        invalid("invalid_exact_evm_insufficient_balance"),
        invalid("invalid_exact_evm_signature"),
        invalid("invalid_payload"),
    ];
    let metrics = metrics(&gateway).await;
    let series = shadow_series(&metrics);
    assert_eq!(
        series,
        expected.iter().map(|name| (name.as_str(), 1.0)).collect::<Vec<_>>(),
        "nothing valid, no amount"
    );
}

#[tokio::test]
async fn a_route_overrides_the_global_mode_either_way() {
    let Some(chain) = Chain::shared().await else { return };
    let upstream = spawn_echo("api").await;
    let served = |answer: &Answer| (answer.status, answer.headers.contains_key("payment-required"));

    let enforced = [("/enforced", None), ("/shadow", Some("shadow"))];
    let gateway = start_gateway(&toml(&upstream, &chain, None, &enforced)).await;
    assert_eq!(served(&get(&gateway.url("/enforced")).await), (StatusCode::PAYMENT_REQUIRED, true));
    assert_eq!(served(&get(&gateway.url("/shadow")).await), (StatusCode::OK, true));

    let shadowed = [("/enforced", Some("enforce")), ("/shadow", None)];
    let gateway = start_gateway(&toml(&upstream, &chain, Some("shadow"), &shadowed)).await;
    assert_eq!(served(&get(&gateway.url("/enforced")).await), (StatusCode::PAYMENT_REQUIRED, true));
    assert_eq!(served(&get(&gateway.url("/shadow")).await), (StatusCode::OK, true));
    assert_eq!(upstream.hits(), 2, "only the calls in shadow mode reached the upstream");
}

#[test]
fn an_unknown_mode_is_a_config_error() {
    let check = |payment: Payment, route: Route| {
        let toml = GatewayToml::new()
            .listen()
            .upstream("api", "http://127.0.0.1:9")
            .payment(payment.facilitator("http://127.0.0.1:9"))
            .route(route);
        x402_gateway::config::Config::parse(&toml.build(), "gateway.toml".as_ref(), ".".as_ref(), &|_| None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let route = || Route::paid("/paid", "api", "1");
    assert!(check(Payment::usdc().set("mode", "shadow"), route().set("mode", "enforce")).is_ok());
    let global = check(Payment::usdc().set("mode", "bogus"), route()).unwrap_err();
    assert_eq!(global, "payment.mode: `bogus`: expected \"enforce\" or \"shadow\"");
    let own = check(Payment::usdc(), route().set("mode", "Shadow")).unwrap_err();
    assert_eq!(own, "routes[0].mode: `Shadow`: expected \"enforce\" or \"shadow\"");
}
