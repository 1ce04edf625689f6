//! Operations: readiness follows the chain and the facilitator, metrics move by exactly what happened,
//! discovery lists exactly the paid routes, and a reload changes prices under load without failing a request.

mod common;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use common::chain::Chain;
use common::config::{toml_value, GatewayToml, Payment, Route};
use common::facilitator::start_reference_facilitator;
use common::pay::{self, Authorization};
use common::tools::require_node;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use x402_gateway::config::Config;

/// `/free`, `/paid` at `price` (GET, with its schemas) and `/ask` priced by model (POST), with an admin listener.
fn toml(upstream: &Upstream, chain: &Chain, price: &str) -> GatewayToml {
    let paid = Route::priced("/paid", "api", price)
        .methods(&["GET"])
        .set("description", "Paid data")
        .set("input", toml_value(r#"{ type = "object", properties = { city = { type = "string" } } }"#))
        .set("output", toml_value(r#"{ type = "object", properties = { temperature = { type = "number" } } }"#));
    let by_model = toml_value(r#"{ by = "body.model", table = { small = "$0.001", large = "$0.01" } }"#);
    GatewayToml::new()
        .listen()
        .admin()
        .upstream("api", &upstream.url())
        .payment(Payment::usdc())
        .route(Route::free("/free", "api"))
        .route(paid)
        .route(Route::free("/ask", "api").methods(&["POST"]).set("price", by_model))
        .network(chain.network())
}

async fn admin_get(gateway: &Gateway, path: &str) -> Answer {
    get(&format!("http://{}{path}", gateway.admin.expect("admin listener"))).await
}

#[tokio::test]
async fn readiness_follows_the_chain_and_the_facilitator() {
    let Some(node) = require_node() else { return };
    // An anvil of its own: it stops it and starts it again.
    let Some(chain) = Chain::own().await else { return };
    let facilitator = start_reference_facilitator(&node, &chain, 0);
    let upstream = spawn_echo("api").await;
    let toml = toml(&upstream, &chain, "$0.001")
        .route(Route::priced("/remote", "api", "$0.001").facilitator(&facilitator.url));
    let gateway = start_gateway(&toml.build()).await;
    let ready = admin_get(&gateway, "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()["checks"].as_array().unwrap().len(), 2);

    // The chain goes away: unready, naming it (and not its URL).
    let (port, facilitator_port) = (chain.port(), facilitator.port);
    drop(facilitator);
    drop(chain);
    let down = admin_get(&gateway, "/readyz").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    let failed: Vec<String> = down.json()["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert!(failed.contains(&"rpc eip155:84532".to_string()), "{failed:?}");
    assert!(failed.iter().any(|n| n.starts_with("facilitator http://127.0.0.1:")), "{failed:?}");
    let rpc_check =
        down.json()["checks"].as_array().unwrap().iter().find(|c| c["name"] == "rpc eip155:84532").cloned().unwrap();
    let rpc_error = rpc_check["error"].as_str().unwrap();
    assert!(
        !rpc_error.contains(&port.to_string()) && !rpc_error.contains("127.0.0.1"),
        "the RPC URL is not shown: {rpc_error}"
    );
    assert_eq!(get(&gateway.url("/free")).await.status, StatusCode::OK, "liveness and free routes are unaffected");
    assert_eq!(admin_get(&gateway, "/healthz").await.status, StatusCode::OK);

    // Both come back: ready again, with nothing restarted in the gateway.
    let chain = Chain::start_at(port).await;
    let _facilitator = start_reference_facilitator(&node, &chain, facilitator_port);
    let back = admin_get(&gateway, "/readyz").await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.text());
}

/// `name{labels}` → value, from the text exposition.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(name, value)| value.parse().ok().map(|v| (name.to_string(), v)))
        .collect()
}

#[tokio::test]
async fn metrics_move_by_exactly_what_happened() {
    let Some(chain) = Chain::shared().await else { return };
    let upstream = spawn_echo("api").await;
    let gateway = start_gateway(&toml(&upstream, &chain, "$0.001").build()).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 1_000_000).await;

    assert_eq!(get(&gateway.url("/free")).await.status, StatusCode::OK);
    let unpaid = get(&gateway.url("/paid")).await;
    assert_eq!(unpaid.status, StatusCode::PAYMENT_REQUIRED);
    let challenge = pay::decode_header(&unpaid.headers["payment-required"]);
    let offer = &challenge["accepts"][0];
    let pay_with = |header: String| {
        let url = gateway.url("/paid");
        async move {
            send(&client(), Request::get(url).header("payment-signature", header).body(Full::default()).unwrap()).await
        }
    };
    let mut underpaid = Authorization::for_offer(buyer.address(), offer);
    underpaid.message.value = U256::from(999);
    let bad = pay_with(pay::v2_header(&challenge["resource"], offer, underpaid.sign(&buyer))).await;
    assert_eq!(bad.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(pay_with("%%%".into()).await.status, StatusCode::BAD_REQUEST);
    let good = Authorization::for_offer(buyer.address(), offer);
    assert_eq!(pay_with(pay::v2_header(&challenge["resource"], offer, good.sign(&buyer))).await.status, StatusCode::OK);

    let scrape = admin_get(&gateway, "/metrics").await;
    assert_eq!(scrape.status, StatusCode::OK);
    let metrics = parse_metrics(&scrape.text());
    let token = chain.token.to_string();
    let expect = [
        ("x402_gateway_requests_total{route=\"/free\",status=\"200\"}".to_string(), 1.0),
        ("x402_gateway_requests_total{route=\"/paid\",status=\"402\"}".into(), 2.0),
        ("x402_gateway_requests_total{route=\"/paid\",status=\"400\"}".into(), 1.0),
        ("x402_gateway_requests_total{route=\"/paid\",status=\"200\"}".into(), 1.0),
        ("x402_gateway_challenges_total{route=\"/paid\"}".into(), 2.0),
        (
            "x402_gateway_payments_rejected_total{route=\"/paid\",reason=\"invalid_exact_evm_authorization_value\"}"
                .into(),
            1.0,
        ),
        ("x402_gateway_payments_rejected_total{route=\"/paid\",reason=\"invalid_payload\"}".into(), 1.0),
        ("x402_gateway_payments_verified_total{route=\"/paid\"}".into(), 1.0),
        ("x402_gateway_settlements_total{route=\"/paid\",outcome=\"success\"}".into(), 1.0),
        (
            format!("x402_gateway_revenue_atomic_total{{route=\"/paid\",network=\"eip155:84532\",asset=\"{token}\"}}"),
            1000.0,
        ),
        ("x402_gateway_upstream_latency_seconds_count".into(), 2.0),
        ("x402_gateway_verification_latency_seconds_count".into(), 1.0),
        ("x402_gateway_settlement_latency_seconds_count".into(), 1.0),
        ("x402_gateway_in_flight_requests".into(), 0.0),
        ("x402_gateway_nonce_reservations".into(), 1.0),
    ];
    for (name, value) in expect {
        assert_eq!(metrics.get(&name), Some(&value), "{name} in:\n{}", scrape.text());
    }
    let series = |prefix: &str| metrics.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(series("x402_gateway_requests_total"), 4, "no other request series");
    assert_eq!(series("x402_gateway_payments_rejected_total"), 2);
}

#[tokio::test]
async fn discovery_lists_exactly_the_paid_routes_with_their_schemas() {
    let Some(chain) = Chain::shared().await else { return };
    let gateway = start_gateway(&toml(&spawn_echo("api").await, &chain, "$0.001").build()).await;
    let answer = get(&gateway.url("/.well-known/x402")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let doc = answer.json();
    let items = doc["items"].as_array().unwrap();
    let resources: Vec<&str> = items.iter().map(|i| i["resource"].as_str().unwrap()).collect();
    let base = gateway.url("");
    assert_eq!(resources, vec![format!("{base}/paid"), format!("{base}/ask")]);
    let paid = &items[0];
    assert_eq!(paid["accepts"][0]["amount"], "1000");
    assert_eq!(paid["description"], "Paid data");
    assert_eq!(paid["extensions"]["bazaar"]["info"]["input"]["queryParams"]["properties"]["city"]["type"], "string");
    let ask = &items[1];
    let amounts: Vec<&str> = ask["accepts"].as_array().unwrap().iter().map(|a| a["amount"].as_str().unwrap()).collect();
    assert_eq!(amounts, vec!["10000", "1000"], "every price of the table");

    // The same schemas travel in the route's challenges: v2 extension and v1 outputSchema.
    let unpaid = get(&gateway.url("/paid")).await;
    let challenge = pay::decode_header(&unpaid.headers["payment-required"]);
    assert_eq!(challenge["extensions"]["bazaar"], paid["extensions"]["bazaar"]);
    assert_eq!(
        challenge["extensions"]["bazaar"]["info"]["output"]["schema"]["properties"]["temperature"]["type"],
        "number"
    );
    let v1 = unpaid.json();
    assert_eq!(v1["accepts"][0]["outputSchema"]["input"]["discoverable"], true);
    assert_eq!(v1["accepts"][0]["outputSchema"]["input"]["method"], "GET");
}

/// `price` of a per-token chat route: two models, capped at $0.50.
const PER_TOKEN: &str = r#"{ by = "body.model", per_token = { "gpt-4o-mini" = { input = "$0.15/1M", output = "$0.60/1M" }, "gpt-4o" = { input = "$2.50/1M", output = "$10/1M" } }, max = "$0.50" }"#;

#[tokio::test]
async fn discovery_shows_a_per_token_routes_rates_and_cap_and_keeps_the_other_routes_shape() {
    let Some(chain) = Chain::shared().await else { return };
    let chat = Route::free("/v1/chat/completions", "api").methods(&["POST"]).set("price", toml_value(PER_TOKEN));
    let gateway = start_gateway(&toml(&spawn_echo("api").await, &chain, "$0.001").route(chat).build()).await;
    let doc = get(&gateway.url("/.well-known/x402")).await.json();
    let items = doc["items"].as_array().unwrap();
    let chat = items.iter().find(|i| i["resource"] == gateway.url("/v1/chat/completions")).expect("the chat route");
    // One offer for every model, at the route's cap, naming the settler that will settle it.
    let accepts = chat["accepts"].as_array().unwrap();
    assert_eq!(accepts.len(), 1, "{accepts:?}");
    assert_eq!((accepts[0]["scheme"].as_str(), accepts[0]["amount"].as_str()), (Some("upto"), Some("500000")));
    assert_eq!(accepts[0]["extra"]["facilitatorAddress"], chain.settler().address().to_string());
    let priced = &chat["metadata"]["perToken"];
    assert_eq!((priced["scheme"].as_str(), priced["by"].as_str()), (Some("upto"), Some("body.model")));
    assert_eq!(priced["max"], "$0.50");
    let models: Vec<&str> = priced["models"].as_array().unwrap().iter().map(|m| m["model"].as_str().unwrap()).collect();
    assert_eq!(models, ["gpt-4o", "gpt-4o-mini"]);
    let mini = &priced["models"][1];
    assert_eq!((mini["input"].as_str(), mini["output"].as_str()), (Some("$0.15/1M"), Some("$0.60/1M")));
    let rates = &mini["rates"][0];
    assert_eq!(rates["asset"], chain.token.to_string());
    assert_eq!((rates["inputPer1M"].as_str(), rates["outputPer1M"].as_str()), (Some("150000"), Some("600000")));
    assert_eq!(rates["max"], "500000");
    assert_eq!(priced["models"][0]["rates"][0]["outputPer1M"], "10000000");
    // Routes priced otherwise keep their shape: `exact` offers, no per-token metadata.
    let paid = items.iter().find(|i| i["resource"] == gateway.url("/paid")).unwrap();
    assert_eq!(
        (paid["accepts"][0]["scheme"].as_str(), paid["accepts"][0]["amount"].as_str()),
        (Some("exact"), Some("1000"))
    );
    assert!(items.iter().filter(|i| *i != chat).all(|i| i.get("metadata").is_none()), "{items:?}");
}

fn parse(toml: &str) -> Config {
    Config::parse(toml, Path::new("gateway.toml"), Path::new("."), &|_| None).expect("valid")
}

#[tokio::test]
async fn a_reload_changes_prices_under_load_without_failing_a_request() {
    let Some(chain) = Chain::shared().await else { return };
    let upstream = spawn_echo("api").await;
    let gateway = start_gateway(&toml(&upstream, &chain, "$0.001").build()).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 1_000_000).await;
    // An authorization spent before the reload stays spent after it.
    let challenge = pay::decode_header(&get(&gateway.url("/paid")).await.headers["payment-required"]);
    let spent = pay::v2_header(
        &challenge["resource"],
        &challenge["accepts"][0],
        Authorization::for_offer(buyer.address(), &challenge["accepts"][0]).sign(&buyer),
    );
    let paid = send(
        &client(),
        Request::get(gateway.url("/paid")).header("payment-signature", &spent).body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(paid.status, StatusCode::OK);

    // Four clients loop (bounded) over a free and a paid route while the price changes underneath.
    let url = gateway.url("");
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let http = client();
                let mut amounts = Vec::new();
                for _ in 0..60 {
                    let free = send(&http, Request::get(format!("{url}/free")).body(Full::default()).unwrap()).await;
                    assert_eq!(free.status, StatusCode::OK);
                    let unpaid = send(&http, Request::get(format!("{url}/paid")).body(Full::default()).unwrap()).await;
                    assert_eq!(unpaid.status, StatusCode::PAYMENT_REQUIRED);
                    amounts
                        .push(pay::decode_header(&unpaid.headers["payment-required"])["accepts"][0]["amount"].clone());
                }
                amounts
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    gateway.pipeline.reload(parse(&toml(&upstream, &chain, "$0.005").build()));
    let mut seen = Vec::new();
    for handle in loops {
        seen.extend(handle.await.expect("no request failed"));
    }
    assert!(seen.iter().all(|a| *a == json!("1000") || *a == json!("5000")), "{seen:?}");
    let after = pay::decode_header(&get(&gateway.url("/paid")).await.headers["payment-required"]);
    assert_eq!(after["accepts"][0]["amount"], "5000", "new requests see the new price");

    // Back to the first price: the authorization spent before both reloads is still refused.
    gateway.pipeline.reload(parse(&toml(&upstream, &chain, "$0.001").build()));
    let metrics = parse_metrics(&admin_get(&gateway, "/metrics").await.text());
    assert_eq!(metrics.get("x402_gateway_nonce_reservations"), Some(&1.0), "reservations survive reloads");
    let replay = send(
        &client(),
        Request::get(gateway.url("/paid")).header("payment-signature", &spent).body(Full::default()).unwrap(),
    )
    .await;
    // Its retry is the original paid answer again (idempotent), not a second charge.
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.headers["x402-replayed"], "true");
    assert_eq!(replay.body, paid.body);
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, U256::from(1000), "one transfer");
}

/// A remote facilitator whose verdicts carry free text, as some do: `/verify` refuses with it when `refuse`,
/// else accepts, and then `/settle` fails with it.
async fn free_text_facilitator(refuse: bool) -> Upstream {
    spawn_upstream(move |request: Request<hyper::body::Incoming>| async move {
        let answer = match request.uri().path() {
            "/verify" if refuse => json!({ "isValid": false, "invalidReason": "node said: nonce 17 too low, retry" }),
            "/verify" => json!({ "isValid": true }),
            "/settle" => {
                json!({ "success": false, "errorReason": "rate limited by node-7, retry in 3s", "transaction": "" })
            }
            _ => json!({ "kinds": [] }),
        };
        http::Response::new(x402_gateway::proxy::body::full(answer.to_string()))
    })
    .await
}

#[tokio::test]
async fn a_facilitators_free_text_reason_is_labelled_other() {
    let upstream = spawn_echo("api").await;
    let refusing = free_text_facilitator(true).await;
    let failing = free_text_facilitator(false).await;
    let toml = GatewayToml::new()
        .listen()
        .admin()
        .upstream("api", &upstream.url())
        .payment(Payment::usdc().facilitator(&refusing.url()))
        .route(Route::paid("/refused", "api", "1000"))
        .route(Route::paid("/unsettled", "api", "1000").facilitator(&failing.url()));
    let gateway = start_gateway(&toml.build()).await;
    let buyer = PrivateKeySigner::random();
    for path in ["/refused", "/unsettled"] {
        let challenge = pay::decode_header(&get(&gateway.url(path)).await.headers["payment-required"]);
        let offer = &challenge["accepts"][0];
        let header = pay::v2_header(
            &challenge["resource"],
            offer,
            Authorization::for_offer(buyer.address(), offer).sign(&buyer),
        );
        let request = Request::get(gateway.url(path)).header("payment-signature", header).body(Full::default());
        assert_eq!(send(&client(), request.unwrap()).await.status, StatusCode::PAYMENT_REQUIRED, "{path}");
    }

    let scrape = admin_get(&gateway, "/metrics").await.text();
    let metrics = parse_metrics(&scrape);
    let rejected = "x402_gateway_payments_rejected_total{route=\"/refused\",reason=\"other\"}";
    assert_eq!(metrics.get(rejected), Some(&1.0), "{scrape}");
    let settlement = "x402_gateway_settlements_total{route=\"/unsettled\",outcome=\"other\"}";
    assert_eq!(metrics.get(settlement), Some(&1.0), "{scrape}");
    assert!(!scrape.contains("nonce 17") && !scrape.contains("node-7"), "no free text in a label: {scrape}");
}

#[tokio::test]
async fn readiness_and_start_up_warnings_show_a_facilitator_url_without_its_key() {
    let key = "sk-readyz-facilitator-41d9";
    // A facilitator that supports nothing: the start-up check warns about it.
    let facilitator =
        spawn_upstream(|_req| async { http::Response::new(x402_gateway::proxy::body::full("{\"kinds\":[]}")) }).await;
    let facilitator_url = format!("{}/v2/{key}", facilitator.url());
    let toml = GatewayToml::new()
        .listen()
        .admin()
        .upstream("api", &spawn_echo("api").await.url())
        .payment(Payment::usdc().facilitator(&facilitator_url))
        .route(Route::paid("/paid", "api", "1000"));
    let gateway = start_gateway(&toml.build()).await;
    let ready = admin_get(&gateway, "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert!(!ready.text().contains(key), "{}", ready.text());
    assert_eq!(ready.json()["checks"][0]["name"], format!("facilitator {}/<redacted>", facilitator.url()));
    let warnings = gateway.pipeline.facilitator_warnings().await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(!warnings[0].contains(key) && warnings[0].contains("/<redacted>"), "{warnings:?}");
    assert!(facilitator.hits() >= 2, "both asked the facilitator");
}
