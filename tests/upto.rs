//! Per-token billing with the `upto` scheme, end to end: an LLM route priced by its tokens, paid by the official
//! clients (`@x402/fetch` with `UptoEvmScheme`, the Python SDK) and by payments signed here, settled in-process
//! on anvil through the real Permit2 and the repository's `x402UptoPermit2Proxy`. The transfer on chain is the
//! usage-priced charge, not the ceiling.

mod common;

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use bytes::Bytes;
use common::chain::Chain;
use common::config::{toml_value, GatewayToml, Payment, Route};
use common::pay::{decode_header, v2_header};
use common::tools::{require_node, Node};
use common::upto::{approve_permit2, Permit};
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::time::Duration;
use x402_gateway::proxy::body::full;

/// Released by a test to let a `hold` stream finish (`hold again`: `HELD_AGAIN`, for another test).
static HELD: tokio::sync::Notify = tokio::sync::Notify::const_new();
static HELD_AGAIN: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// Never released: a `stall` stream stops after its three deltas, until the test ends.
static STALLED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// `$1/1M` input and `$2/1M` output in USDC's six decimals: 1 and 2 atomic units per token.
const PRICE: &str = r#"{ by = "body.model", per_token = { "m" = { input = "$1/1M", output = "$2/1M" } }, max = "$0.50", default_max_tokens = 100, inject_max_tokens = "max_tokens" }"#;
/// The usage every answer of the test upstream reports: 40 prompt and 30 completion tokens, 100 units.
const CHARGE: u64 = 40 + 2 * 30;
const FUNDS: u64 = 1_000_000;

/// An LLM API written for the test. `messages[0].content` says how it answers: `fail` (500), `override`
/// (`Settlement-Overrides` above any ceiling), `cut` (a stream that breaks after three deltas), `stall` (one
/// that stops after them), `hold` and `hold again` (one that waits after them for the test); else a JSON
/// answer or, with `"stream": true`, an SSE stream, each with its usage. Every answer echoes the token limit
/// the request reached it with.
async fn spawn_llm() -> Upstream {
    spawn_upstream(|request: Request<Incoming>| async move {
        let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let request: Value = serde_json::from_slice(&body).unwrap_or_default();
        let said = request.pointer("/messages/0/content").and_then(Value::as_str).unwrap_or_default().to_string();
        let limit = request["max_tokens"].clone();
        let usage = json!({ "prompt_tokens": 40, "completion_tokens": 30 });
        if said == "fail" {
            let mut response = Response::new(full(r#"{"error":"model overloaded"}"#));
            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            return response;
        }
        if request["stream"] == true {
            let delta = |text: &str| format!("data: {}\n\n", json!({ "choices": [{ "delta": { "content": text } }] }));
            let mut frames: Vec<Result<Bytes, &'static str>> =
                ["hello ", "paid ", "world"].iter().map(|t| Ok(Bytes::from(delta(t)))).collect();
            if said == "cut" {
                frames.push(Err("the model crashed"));
            } else {
                let asked = request.pointer("/stream_options/include_usage").cloned().unwrap_or_default();
                let last = json!({ "choices": [], "usage": usage, "max_tokens_seen": limit, "include_usage_seen": asked });
                frames.push(Ok(Bytes::from(format!("data: {last}\n\ndata: [DONE]\n\n"))));
            }
            let held = match said.as_str() {
                "hold" => Some(&HELD),
                "hold again" => Some(&HELD_AGAIN),
                "stall" => Some(&STALLED),
                _ => None,
            };
            let mut response = Response::new(streamed(frames, held).boxed_unsync());
            response.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            return response;
        }
        let answer = json!({ "choices": [{ "message": { "content": "hello paid world" } }], "usage": usage, "max_tokens_seen": limit });
        let mut response = Response::new(full(answer.to_string()));
        response.headers_mut().insert("content-type", "application/json".parse().unwrap());
        if said == "override" {
            response.headers_mut().insert("settlement-overrides", r#"{"amount":"$5"}"#.parse().unwrap());
        }
        response
    })
    .await
}

/// A body that sends `frames` in order, a moment apart, an error ending it where one is: as a model that breaks
/// mid-answer, after its first events have gone out. With `held`, the last waits for the test to release it.
fn streamed(frames: Vec<Result<Bytes, &'static str>>, held: Option<&'static tokio::sync::Notify>) -> Channel {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let last = frames.len().saturating_sub(1);
    tokio::spawn(async move {
        for (index, frame) in frames.into_iter().enumerate() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let (Some(held), true) = (held, index == last) {
                held.notified().await;
            }
            if sender.send(frame.map(http_body::Frame::data).map_err(Into::into)).await.is_err() {
                return;
            }
        }
    });
    Channel(receiver)
}

struct Channel(tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, x402_gateway::proxy::body::BoxError>>);

impl http_body::Body for Channel {
    type Data = Bytes;
    type Error = x402_gateway::proxy::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// The test LLM, behind a gateway that settles in-process; the upstream lives as long as it is held.
async fn llm_gateway(chain: &Chain) -> (Upstream, Gateway) {
    let upstream = spawn_llm().await;
    let gateway = start_gateway(&llm_toml(&upstream, chain).build()).await;
    (upstream, gateway)
}

fn llm_toml(upstream: &Upstream, chain: &Chain) -> GatewayToml {
    llm_toml_settled_by(upstream, chain, "local")
}

/// The LLM route, with `extra` added to its price (`, key = value`).
fn llm_toml_priced(upstream: &Upstream, chain: &Chain, extra: &str) -> GatewayToml {
    let price = format!("{}{extra} }}", PRICE.trim_end_matches('}').trim_end());
    GatewayToml::new()
        .listen()
        .upstream("llm", &upstream.url())
        .payment(Payment::usdc().facilitator("local"))
        .route(Route::free("/v1/chat/completions", "llm").methods(&["POST"]).set("price", toml_value(&price)))
        .network(chain.network())
}

/// The LLM route, settled by `facilitator` (`"local"` or a URL).
fn llm_toml_settled_by(upstream: &Upstream, chain: &Chain, facilitator: &str) -> GatewayToml {
    GatewayToml::new()
        .listen()
        .upstream("llm", &upstream.url())
        .payment(Payment::usdc().facilitator(facilitator))
        .route(Route::free("/v1/chat/completions", "llm").methods(&["POST"]).set("price", toml_value(PRICE)))
        .network(chain.network())
}

fn chat(content: &str, stream: bool) -> String {
    json!({ "model": "m", "messages": [{ "role": "user", "content": content }], "stream": stream }).to_string()
}

/// The ceiling the gateway offers for `body`: its bytes at 1 unit, plus the default 100 tokens at 2.
fn ceiling(body: &str) -> u64 {
    body.len() as u64 + 2 * 100
}

fn post(url: &str, body: &str, payment: Option<&str>) -> Request<Full<Bytes>> {
    let mut request = Request::post(url).header("content-type", "application/json");
    if let Some(payment) = payment {
        request = request.header("payment-signature", payment);
    }
    request.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

/// The 402 for `body`: its resource and its one `upto` offer.
async fn offer(gateway: &Gateway, body: &str) -> (Value, Value) {
    offer_at(&gateway.url("/v1/chat/completions"), body).await
}

/// A payment of `body`'s 402 offer, signed by `buyer` as the official client signs it, as its header.
async fn paid_header(gateway: &Gateway, body: &str, buyer: &PrivateKeySigner) -> String {
    let (resource, accepted) = offer(gateway, body).await;
    v2_header(&resource, &accepted, Permit::for_offer(&accepted).sign(buyer))
}

async fn offer_at(url: &str, body: &str) -> (Value, Value) {
    let answer = send(&client(), post(url, body, None)).await;
    assert_eq!(answer.status, 402, "{}", answer.text());
    let required = decode_header(answer.headers.get("payment-required").expect("PAYMENT-REQUIRED"));
    assert_eq!(required["accepts"].as_array().unwrap().len(), 1, "{required}");
    assert!(required["extensions"]["eip2612GasSponsoring"].is_object(), "gas sponsoring is declared: {required}");
    (required["resource"].clone(), required["accepts"][0].clone())
}

/// Runs an official client script (`pay.mjs --client v2` or `pay.py`) paying `body` to the route.
async fn official_pays(
    command: std::process::Command,
    gateway: &Gateway,
    buyer: &PrivateKeySigner,
    body: &str,
) -> Value {
    let mut command = command;
    command
        .args(["--url", &gateway.url("/v1/chat/completions"), "--key-env", "X402_TEST_BUYER_KEY", "--method", "POST"])
        .args(["--header", "Content-Type: application/json", "--body", body])
        .env("X402_TEST_BUYER_KEY", alloy::hex::encode_prefixed(buyer.to_bytes()));
    let output = tokio::task::spawn_blocking(move || command.output().expect("the client runs")).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the official client failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("no JSON from the client ({e}): {stderr}"))
}

fn pay_mjs(node: &Node, rpc: Option<&str>) -> std::process::Command {
    let mut command = node.script("pay.mjs");
    command.args(["--client", "v2"]);
    if let Some(rpc) = rpc {
        command.args(["--rpc", rpc]);
    }
    command
}

/// A buyer with `FUNDS`, no ether, and (if `approved`) Permit2's allowance.
async fn buyer(chain: &Chain, approved: bool) -> PrivateKeySigner {
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), FUNDS).await;
    if approved {
        approve_permit2(chain, buyer.address()).await;
    }
    buyer
}

/// The buyer's balance once it has settled below `FUNDS` (a stream settles after its answer), or as it is
/// after a bounded wait.
async fn settled_balance(chain: &Chain, buyer: Address) -> U256 {
    for _ in 0..100 {
        let balance = chain.balance(buyer).await;
        if balance < U256::from(FUNDS) {
            return balance;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    chain.balance(buyer).await
}

/// The only ledger row of `buyer`.
async fn row(gateway: &Gateway, buyer: Address) -> x402_gateway::ledger::Row {
    let rows = gateway.pipeline.ledger().list(None, None, Some(buyer.to_string()), 10).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows.into_iter().next().unwrap()
}

#[tokio::test]
async fn the_official_client_pays_what_the_answer_used_not_the_ceiling() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let upstream = spawn_llm().await;
    let gateway = start_gateway(&llm_toml(&upstream, &chain).admin().build()).await;
    let buyer = buyer(&chain, true).await;
    let body = chat("hi", false);
    let report = official_pays(pay_mjs(&node, None), &gateway, &buyer, &body).await;
    assert_eq!(report["status"], 200, "{report}");
    assert_eq!(report["settlement"]["success"], true, "{report}");
    assert_eq!(report["settlement"]["amount"], CHARGE.to_string(), "the receipt names the charge: {report}");
    let answer: Value = serde_json::from_str(report["body"].as_str().unwrap()).unwrap();
    assert_eq!(answer["max_tokens_seen"], 100, "the route's default limit reached the upstream");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS - CHARGE));
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, U256::from(CHARGE), "the payee got the charge");
    let row = row(&gateway, buyer.address()).await;
    assert_eq!((row.scheme.as_str(), row.state.as_str()), ("upto", "settled"));
    assert_eq!(row.amount, U256::from(ceiling(&body)), "the row keeps the ceiling the buyer signed");
    assert_eq!(row.charged, Some(U256::from(CHARGE)));
    assert_eq!((row.prompt_tokens, row.completion_tokens), (Some(40), Some(30)));
    let revenue = gateway.pipeline.ledger().revenue().await.unwrap();
    assert_eq!(revenue.iter().map(|r| r.amount.parse::<u64>().unwrap()).sum::<u64>(), CHARGE, "{revenue:?}");
    let metrics = get(&format!("http://{}/metrics", gateway.admin.unwrap())).await.text();
    for line in [
        r#"x402_gateway_upto_charges_total{route="/v1/chat/completions",basis="usage"} 1"#,
        r#"x402_gateway_upto_tokens_total{route="/v1/chat/completions",kind="prompt"} 40"#,
        r#"x402_gateway_upto_tokens_total{route="/v1/chat/completions",kind="completion"} 30"#,
        "x402_gateway_upto_charged_ratio_count 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
}

#[tokio::test]
async fn the_reference_facilitator_settles_the_charge_not_the_ceiling() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let facilitator = common::facilitator::start_reference_facilitator(&node, &chain, 0);
    let upstream = spawn_llm().await;
    let gateway = start_gateway(&llm_toml_settled_by(&upstream, &chain, &facilitator.url).build()).await;
    let buyer = buyer(&chain, true).await;
    let body = chat("hi", false);
    let (_, accepted) = offer(&gateway, &body).await;
    let signer: PrivateKeySigner = chain.facilitator_key.parse().unwrap();
    assert_eq!(accepted["extra"]["facilitatorAddress"], signer.address().to_string(), "as /supported announced it");
    // Discovery names it too, once learned.
    let discovered = get(&gateway.url("/.well-known/x402")).await.json();
    let listed = &discovered["items"][0]["accepts"][0];
    assert_eq!(listed["extra"]["facilitatorAddress"], signer.address().to_string(), "{discovered}");
    let report = official_pays(pay_mjs(&node, None), &gateway, &buyer, &body).await;
    assert_eq!(report["status"], 200, "{report}");
    assert_eq!(report["settlement"]["amount"], CHARGE.to_string(), "{report}");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS - CHARGE));
    let row = row(&gateway, buyer.address()).await;
    assert_eq!((row.state.as_str(), row.charged), ("settled", Some(U256::from(CHARGE))));

    // A stream, settled by the reference facilitator once it has ended.
    let streamer = self::buyer(&chain, true).await;
    let report = official_pays(pay_mjs(&node, None), &gateway, &streamer, &chat("hi", true)).await;
    assert_eq!(report["status"], 200, "{report}");
    assert_eq!(settled_balance(&chain, streamer.address()).await, U256::from(FUNDS - CHARGE));
}

#[tokio::test]
async fn a_first_time_buyer_without_allowance_or_ether_pays_through_its_eip2612_permit() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (_upstream, gateway) = llm_gateway(&chain).await;
    let buyer = buyer(&chain, false).await;
    let report = official_pays(pay_mjs(&node, Some(&chain.rpc_url)), &gateway, &buyer, &chat("hi", false)).await;
    assert_eq!(report["status"], 200, "{report}");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS - CHARGE));
    use alloy::providers::Provider;
    let sent = chain.provider.get_transaction_count(buyer.address()).await.unwrap();
    assert_eq!(sent, 0, "the buyer sent no transaction of its own");
}

#[tokio::test]
async fn the_python_sdk_pays_by_usage_too() {
    let Some(python) = common::tools::require(common::tools::python()) else { return };
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (_upstream, gateway) = llm_gateway(&chain).await;
    let buyer = buyer(&chain, true).await;
    let report = official_pays(python.script("pay.py"), &gateway, &buyer, &chat("hi", false)).await;
    assert_eq!(report["status"], 200, "{report}");
    assert_eq!(report["settlement"]["amount"], CHARGE.to_string(), "{report}");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS - CHARGE));

    // A stream, read whole by the SDK's client: it settles its usage once it has ended.
    let streamer = self::buyer(&chain, true).await;
    let report = official_pays(python.script("pay.py"), &gateway, &streamer, &chat("hi", true)).await;
    assert_eq!(report["status"], 200, "{report}");
    assert!(report["body"].as_str().unwrap().contains("[DONE]"), "{report}");
    assert_eq!(settled_balance(&chain, streamer.address()).await, U256::from(FUNDS - CHARGE));
}

#[tokio::test]
async fn the_python_sdk_pays_through_the_reference_facilitator() {
    let Some(node) = require_node() else { return };
    let Some(python) = common::tools::require(common::tools::python()) else { return };
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let facilitator = common::facilitator::start_reference_facilitator(&node, &chain, 0);
    let upstream = spawn_llm().await;
    let gateway = start_gateway(&llm_toml_settled_by(&upstream, &chain, &facilitator.url).build()).await;
    let buyer = buyer(&chain, true).await;
    let report = official_pays(python.script("pay.py"), &gateway, &buyer, &chat("hi", false)).await;
    assert_eq!(report["status"], 200, "{report}");
    assert_eq!(report["settlement"]["amount"], CHARGE.to_string(), "{report}");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS - CHARGE));

    let streamer = self::buyer(&chain, true).await;
    let report = official_pays(python.script("pay.py"), &gateway, &streamer, &chat("hi", true)).await;
    assert_eq!(report["status"], 200, "{report}");
    assert_eq!(settled_balance(&chain, streamer.address()).await, U256::from(FUNDS - CHARGE));
}

#[tokio::test]
async fn a_stream_is_paid_by_its_final_usage_with_the_receipt_in_the_trailers() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (_upstream, gateway) = llm_gateway(&chain).await;

    // The official client reads the stream; the charge settles once it has ended.
    let buyer_one = buyer(&chain, true).await;
    let report = official_pays(pay_mjs(&node, None), &gateway, &buyer_one, &chat("hi", true)).await;
    assert_eq!(report["status"], 200, "{report}");
    assert!(report["body"].as_str().unwrap().contains("paid "), "{report}");
    assert_eq!(settled_balance(&chain, buyer_one.address()).await, U256::from(FUNDS - CHARGE));

    // Over HTTP/2 the receipt arrives as a trailer, after the last event.
    let buyer_two = buyer(&chain, true).await;
    let body = chat("hi", true);
    let header = paid_header(&gateway, &body, &buyer_two).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let response = h2.request(post(&gateway.url("/v1/chat/completions"), &body, Some(&header))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("payment-response").is_none(), "no receipt before the answer is known");
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert!(String::from_utf8_lossy(&collected.to_bytes()).contains("[DONE]"));
    let receipt = decode_header(trailers.get("payment-response").expect("the receipt trailer"));
    assert_eq!(receipt["success"], true, "{receipt}");
    assert_eq!(receipt["amount"], CHARGE.to_string(), "{receipt}");
    assert_eq!(chain.balance(buyer_two.address()).await, U256::from(FUNDS - CHARGE));

    // Over HTTP/1.1 too, to a client that says it takes trailers.
    let buyer_three = buyer(&chain, true).await;
    let three = paid_header(&gateway, &body, &buyer_three).await;
    let mut request = post(&gateway.url("/v1/chat/completions"), &body, Some(&three));
    request.headers_mut().insert("te", "trailers".parse().unwrap());
    let response = client().request(request).await.unwrap();
    assert_eq!(response.headers().get("trailer").map(|v| v.as_bytes()), Some(&b"PAYMENT-RESPONSE"[..]));
    let trailers = response.into_body().collect().await.unwrap().trailers().cloned().expect("HTTP/1.1 trailers");
    assert_eq!(decode_header(trailers.get("payment-response").unwrap())["amount"], CHARGE.to_string());

    // A retry with the same authorization gets the kept answer and its receipt, and pays nothing more.
    let again = send(&client(), post(&gateway.url("/v1/chat/completions"), &body, Some(&header))).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.headers.get("x402-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]));
    assert!(again.headers.get("payment-response").is_some());
    assert_eq!(chain.balance(buyer_two.address()).await, U256::from(FUNDS - CHARGE));
}

#[tokio::test]
async fn a_stream_cut_halfway_is_charged_the_estimate_of_what_was_delivered() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (_upstream, gateway) = llm_gateway(&chain).await;
    let buyer = buyer(&chain, true).await;
    let body = chat("cut", true);
    let header = paid_header(&gateway, &body, &buyer).await;
    let response = client().request(post(&gateway.url("/v1/chat/completions"), &body, Some(&header))).await.unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.into_body().collect().await;
    // The prompt at 4 bytes a token (1 unit each), and the 16 bytes of text delivered at 4 a token (2 units).
    let estimate = (body.len() as u64).div_ceil(4) + 2 * "hello paid world".len().div_ceil(4) as u64;
    assert_eq!(settled_balance(&chain, buyer.address()).await, U256::from(FUNDS - estimate));
    let row = row(&gateway, buyer.address()).await;
    assert_eq!(row.charged, Some(U256::from(estimate)));
    assert_eq!(row.prompt_tokens, None, "no usage arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_gateway_is_killed_in_the_middle_of_is_charged_what_it_sent_once_restarted() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    killed_mid_stream_then_restarted(&chain, "local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_facilitator_settles_a_stream_the_gateway_was_killed_in_the_middle_of() {
    let Some(node) = require_node() else { return };
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let facilitator = common::facilitator::start_reference_facilitator(&node, &chain, 0);
    killed_mid_stream_then_restarted(&chain, &facilitator.url).await;
}

/// A gateway settling through `facilitator` is killed while a stream stalls after its first deltas, then
/// started again on the same ledger.
async fn killed_mid_stream_then_restarted(chain: &Chain, facilitator: &str) {
    let upstream = spawn_llm().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = test_dir();
    let config = dir.join("gateway.toml");
    let toml = llm_toml_settled_by(&upstream, chain, facilitator).listen_on(&format!("127.0.0.1:{port}"));
    std::fs::write(&config, toml.build()).unwrap();
    let mut gateway = binary::start(&config);
    binary::wait_listening(port, &config).await;

    // The stream sends its three deltas, then stalls: the gateway is killed while the buyer waits for more.
    let buyer = buyer(chain, true).await;
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let body = chat("stall", true);
    let (resource, accepted) = offer_at(&url, &body).await;
    let signed = Permit::for_offer(&accepted).sign(&buyer);
    let signature = signed["signature"].as_str().expect("a signature").to_string();
    let header = v2_header(&resource, &accepted, signed);
    let response = client().request(post(&url, &body, Some(&header))).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut answer = response.into_body();
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains("world") {
        let frame = tokio::time::timeout(Duration::from_secs(10), answer.frame()).await.expect("the deltas arrive");
        received.extend_from_slice(frame.expect("a frame").unwrap().data_ref().expect("data"));
    }
    // What went out, priced as a stream cut short is: the prompt at 4 bytes a token (1 unit each), and the
    // 16 bytes of text at 4 a token (2 units each).
    let estimate = (body.len() as u64).div_ceil(4) + 2 * "hello paid world".len().div_ceil(4) as u64;
    let ledger = x402_gateway::ledger::Ledger::open(&dir.join("data/ledger.db")).unwrap();
    let mut recorded = None;
    for _ in 0..100 {
        let rows = ledger.list(None, None, Some(buyer.address().to_string()), 10).await.unwrap();
        recorded = rows.into_iter().next();
        if recorded.as_ref().is_some_and(|row| row.charged == Some(U256::from(estimate))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recorded = recorded.expect("the stream's row");
    assert_eq!(recorded.charged, Some(U256::from(estimate)), "the row knows what went out: {recorded:?}");
    assert_eq!(recorded.state, "verified");
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    drop(answer);
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS), "nothing settled before the kill");

    // Restarted, the gateway settles what the stream sent, once, to the payee.
    let mut gateway = binary::start(&config);
    binary::wait_listening(port, &config).await;
    let balance = settled_balance(chain, buyer.address()).await;
    // The chain shows the transfer a moment before the facilitator's answer is recorded.
    for _ in 0..100 {
        if ledger.get(recorded.id).await.unwrap().is_some_and(|row| row.state == "settled") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A buyer that sends the same authorization again is refused, and pays nothing more.
    let again = send(&client(), post(&url, &body, Some(&header))).await;
    let log = binary::log(&config);
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    assert_eq!(balance, U256::from(FUNDS - estimate), "the gateway's log:\n{log}");
    let row = ledger.get(recorded.id).await.unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.served, row.charged), ("settled", true, Some(U256::from(estimate))));
    assert!(row.transaction.is_some(), "{row:?}");
    assert_eq!(row.settle_ticket, None, "spent, the signed payment is not kept");
    let hex = signature.trim_start_matches("0x");
    assert!(!log.contains(&header) && !log.contains(hex), "the buyer's payment is never logged");
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS - estimate));
}

#[tokio::test]
async fn an_upstream_error_is_charged_nothing_and_sends_no_transaction() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (_upstream, gateway) = llm_gateway(&chain).await;
    let buyer = buyer(&chain, true).await;
    let body = chat("fail", false);
    let header = paid_header(&gateway, &body, &buyer).await;
    let answer = send(&client(), post(&gateway.url("/v1/chat/completions"), &body, Some(&header))).await;
    assert_eq!(answer.status, 500);
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS));
    let row = row(&gateway, buyer.address()).await;
    assert_eq!((row.state.as_str(), row.transaction.as_deref()), ("released", None));
}

#[tokio::test]
async fn an_upstream_override_above_the_ceiling_is_capped_and_never_reaches_the_buyer() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (_upstream, gateway) = llm_gateway(&chain).await;
    let buyer = buyer(&chain, true).await;
    let body = chat("override", false);
    let header = paid_header(&gateway, &body, &buyer).await;
    let answer = send(&client(), post(&gateway.url("/v1/chat/completions"), &body, Some(&header))).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(answer.headers.get("settlement-overrides").is_none());
    let receipt = decode_header(answer.headers.get("payment-response").unwrap());
    assert_eq!(receipt["amount"], ceiling(&body).to_string(), "$5 asked, the ceiling charged");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS - ceiling(&body)));
}

#[tokio::test]
async fn bent_authorizations_are_refused_before_the_upstream_and_none_is_charged_twice() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (upstream, gateway) = llm_gateway(&chain).await;
    let buyer = buyer(&chain, true).await;
    let body = chat("hi", false);
    let (resource, accepted) = offer(&gateway, &body).await;
    let url = gateway.url("/v1/chat/completions");
    let other: Address = PrivateKeySigner::random().address();
    type Bend = Box<dyn Fn(&mut Permit)>;
    let bent: [(&str, Bend); 6] = [
        ("permit2_amount_mismatch", Box::new(|p| p.ceiling += U256::from(1))),
        ("invalid_permit2_recipient_mismatch", Box::new(move |p| p.pay_to = other)),
        ("upto_facilitator_mismatch", Box::new(move |p| p.facilitator = other)),
        ("permit2_deadline_expired", Box::new(|p| p.deadline = common::pay::now() - 1)),
        // Valid for a few seconds only: it would lapse while its answer streams, to be served unpaid.
        ("permit2_deadline_expired", Box::new(|p| p.deadline = common::pay::now() + 10)),
        ("invalid_permit2_spender", Box::new(move |p| p.spender = other)),
    ];
    for (reason, bend) in bent {
        let mut permit = Permit::for_offer(&accepted);
        bend(&mut permit);
        let header = v2_header(&resource, &accepted, permit.sign(&buyer));
        let answer = send(&client(), post(&url, &body, Some(&header))).await;
        assert_eq!(answer.status, 402, "{reason}: {}", answer.text());
        let required = decode_header(answer.headers.get("payment-required").unwrap());
        assert_eq!(required["error"], reason);
    }
    // A ceiling other than this request's: the offer it names is not ours.
    let mut cheaper = accepted.clone();
    cheaper["amount"] = "1".into();
    let mut permit = Permit::for_offer(&cheaper);
    permit.ceiling = U256::from(1);
    let answer = send(&client(), post(&url, &body, Some(&v2_header(&resource, &cheaper, permit.sign(&buyer))))).await;
    assert_eq!(answer.status, 402);
    assert_eq!(decode_header(answer.headers.get("payment-required").unwrap())["error"], "invalid_payment_requirements");
    assert_eq!(upstream.hits(), 0, "nothing was forwarded unpaid");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS));

    // Paid once; the same authorization again replays the kept answer and charges nothing more.
    let header = v2_header(&resource, &accepted, Permit::for_offer(&accepted).sign(&buyer));
    let paid = send(&client(), post(&url, &body, Some(&header))).await;
    assert_eq!(paid.status, 200, "{}", paid.text());
    let replayed = send(&client(), post(&url, &body, Some(&header))).await;
    assert_eq!(replayed.status, 200);
    assert_eq!(replayed.body, paid.body);
    assert_eq!(upstream.hits(), 1);
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS - CHARGE));
}

#[tokio::test]
async fn a_buyer_with_neither_allowance_nor_permit_gets_412() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (upstream, gateway) = llm_gateway(&chain).await;
    let buyer = buyer(&chain, false).await;
    let body = chat("hi", false);
    let header = paid_header(&gateway, &body, &buyer).await;
    let answer = send(&client(), post(&gateway.url("/v1/chat/completions"), &body, Some(&header))).await;
    assert_eq!(answer.status, 412, "{}", answer.text());
    let required = decode_header(answer.headers.get("payment-required").unwrap());
    assert_eq!(required["error"], "permit2_allowance_required");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_streamed_answer_whose_settlement_fails_keeps_its_authorization_spent() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (upstream, gateway) = llm_gateway(&chain).await;
    let buyer = buyer(&chain, true).await;
    let body = chat("hold", true);
    let header = paid_header(&gateway, &body, &buyer).await;
    let url = gateway.url("/v1/chat/completions");
    let response = client().request(post(&url, &body, Some(&header))).await.unwrap();
    assert_eq!(response.status(), 200, "verified, streaming");
    // Mid-stream, the buyer takes its allowance back: the settlement cannot pull the charge.
    common::upto::revoke_permit2(&chain, buyer.address()).await;
    HELD.notify_one();
    let _ = response.into_body().collect().await;
    for _ in 0..100 {
        if row(&gateway, buyer.address()).await.state.as_str() != "verified" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let row = row(&gateway, buyer.address()).await;
    assert_eq!(row.state.as_str(), "settling", "left for reconciliation, never freed: {row:?}");
    // Allowance back: the same authorization buys no second answer.
    approve_permit2(&chain, buyer.address()).await;
    let again = send(&client(), post(&url, &body, Some(&header))).await;
    assert_eq!(again.status, 402, "{}", again.text());
    assert_eq!(decode_header(again.headers.get("payment-response").unwrap())["errorReason"], "settlement_pending");
    assert_eq!(upstream.hits(), 1, "the stream alone: the retry was not served");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS));

    // Reconciliation finds that nothing moved. Still, an authorization whose answer went out unpaid never
    // buys another one.
    let report = gateway.pipeline.reconcile(common::pay::now() + 3600).await.unwrap();
    assert_eq!(report.failed, 1, "{report:?}");
    let row = self::row(&gateway, buyer.address()).await;
    assert_eq!((row.state.as_str(), row.served), ("failed", true), "{row:?}");
    let again = send(&client(), post(&url, &body, Some(&header))).await;
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(upstream.hits(), 1, "still the stream alone");
    assert_eq!(chain.balance(buyer.address()).await, U256::from(FUNDS));
}

#[tokio::test]
async fn a_token_without_permit_is_offered_without_gas_sponsoring() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let upstream = spawn_llm().await;
    let toml = llm_toml(&upstream, &chain).network(chain.network().asset_setting("USDC", "eip2612", false));
    let gateway = start_gateway(&toml.build()).await;
    let answer = send(&client(), post(&gateway.url("/v1/chat/completions"), &chat("hi", false), None)).await;
    assert_eq!(answer.status, 402);
    let required = decode_header(answer.headers.get("payment-required").expect("PAYMENT-REQUIRED"));
    assert_eq!(required["accepts"][0]["scheme"], "upto", "{required}");
    assert!(required["extensions"].get("eip2612GasSponsoring").is_none(), "{required}");
}

#[tokio::test]
async fn several_completions_raise_the_ceiling_and_a_bad_count_is_refused() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (_upstream, gateway) = llm_gateway(&chain).await;
    let three = json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }], "n": 3 }).to_string();
    let (_, accepted) = offer(&gateway, &three).await;
    assert_eq!(accepted["amount"], (three.len() as u64 + 3 * 2 * 100).to_string(), "three completions of 100 tokens");
    let url = gateway.url("/v1/chat/completions");
    for bad in [json!(0), json!(-1), json!(1.5), json!(100000)] {
        let body = json!({ "model": "m", "messages": [], "n": bad }).to_string();
        let answer = send(&client(), post(&url, &body, None)).await;
        assert_eq!(answer.status, 400, "n = {bad}");
        assert_eq!(answer.json()["error"], "invalid_token_limit");
    }
}

#[tokio::test]
async fn a_stream_is_made_to_report_its_usage_where_the_operator_asks() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let upstream = spawn_llm().await;
    let url_of = |gateway: &Gateway| gateway.url("/v1/chat/completions");
    for (extra, expected) in [("", "null"), (", inject_stream_usage = true", "true")] {
        let gateway = start_gateway(&llm_toml_priced(&upstream, &chain, extra).build()).await;
        let buyer = buyer(&chain, true).await;
        let body = chat("hi", true);
        let (resource, accepted) = offer(&gateway, &body).await;
        let header = v2_header(&resource, &accepted, Permit::for_offer(&accepted).sign(&buyer));
        let answer = send(&client(), post(&url_of(&gateway), &body, Some(&header))).await;
        assert_eq!(answer.status, 200);
        let seen = format!("\"include_usage_seen\":{expected}");
        assert!(answer.text().contains(&seen), "{extra}: {}", answer.text());
        assert_eq!(settled_balance(&chain, buyer.address()).await, U256::from(FUNDS - CHARGE));
    }
}

#[tokio::test]
async fn a_buyers_streams_served_at_once_must_fit_its_balance_together() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let (_upstream, gateway) = llm_gateway(&chain).await;
    let body = chat("hold again", true);
    let (resource, accepted) = offer(&gateway, &body).await;
    // Enough for one ceiling, not two.
    let buyer = PrivateKeySigner::random();
    let funds = 2 * ceiling(&body) - 1;
    chain.mint(buyer.address(), funds).await;
    approve_permit2(&chain, buyer.address()).await;
    let url = gateway.url("/v1/chat/completions");
    let pay = || v2_header(&resource, &accepted, Permit::for_offer(&accepted).sign(&buyer));
    let mut request = post(&url, &body, Some(&pay()));
    request.headers_mut().insert("te", "trailers".parse().unwrap());
    let first = client().request(request).await.unwrap();
    assert_eq!(first.status(), 200, "the first stream is being served");
    let second = send(&client(), post(&url, &body, Some(&pay()))).await;
    assert_eq!(second.status, 402, "{}", second.text());
    assert_eq!(decode_header(second.headers.get("payment-required").unwrap())["error"], "permit2_insufficient_balance");
    HELD_AGAIN.notify_one();
    // The stream ends with its receipt, once it has settled.
    let trailers = first.into_body().collect().await.unwrap().trailers().cloned().expect("the receipt");
    assert_eq!(decode_header(trailers.get("payment-response").unwrap())["amount"], CHARGE.to_string());
    assert_eq!(chain.balance(buyer.address()).await, U256::from(funds - CHARGE));
    // Once it has settled, the buyer's balance counts for its next payment alone.
    let third = send(
        &client(),
        post(
            &url,
            &chat("hi", false),
            Some(&{
                let (resource, accepted) = offer(&gateway, &chat("hi", false)).await;
                v2_header(&resource, &accepted, Permit::for_offer(&accepted).sign(&buyer))
            }),
        ),
    )
    .await;
    assert_eq!(third.status, 200, "{}", third.text());
}
