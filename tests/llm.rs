//! LLM resale: prices chosen by the request's model, OpenAI-compatible routes with the operator's key,
//! SSE streamed through, usage logged with the payment, and a free model catalogue.

mod common;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use bytes::Bytes;
use common::chain::Chain;
use common::config::{toml_value, GatewayToml, Payment, Route};
use common::pay::{self, Authorization};
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use x402_gateway::proxy::body::full;

const OPERATOR_KEY: &str = "sk-operator-secret";

/// A fake OpenAI: refuses any key but the operator's; streams SSE (each chunk released by the test) or
/// answers JSON, with `usage`, and echoes what it was sent.
async fn fake_openai(
    release: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
    seen_auth: Arc<Mutex<Vec<String>>>,
) -> Upstream {
    spawn_upstream(move |request: Request<hyper::body::Incoming>| {
        let (release, seen_auth) = (release.clone(), seen_auth.clone());
        async move {
            let auth = request.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            seen_auth.lock().unwrap().push(auth.clone());
            if auth != format!("Bearer {OPERATOR_KEY}") {
                let mut refused = Response::new(full("{\"error\":\"invalid api key\"}"));
                *refused.status_mut() = StatusCode::UNAUTHORIZED;
                return refused;
            }
            let body: Value = serde_json::from_slice(&request.into_body().collect().await.unwrap().to_bytes()).unwrap();
            let model = body["model"].as_str().unwrap_or("?").to_string();
            if body["stream"] == true {
                let (mut tx, stream) = Channel::<Bytes, Infallible>::new(8);
                tokio::spawn(async move {
                    let chunk = |text: &str| format!("data: {}\n\n", json!({"model": model, "choices": [{"delta": {"content": text}}]}));
                    let _ = tx.send_data(chunk("Hel").into()).await;
                    let _ = release.lock().await.recv().await;
                    let _ = tx.send_data(chunk("lo").into()).await;
                    let usage = json!({"model": model, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}});
                    let _ = tx.send_data(format!("data: {usage}\n\ndata: [DONE]\n\n").into()).await;
                });
                let mut response = Response::new(stream.map_err(|never| match never {}).boxed_unsync());
                response.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
                response
            } else {
                let answer = json!({"model": model, "data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 8, "total_tokens": 8}});
                let mut response = Response::new(full(answer.to_string()));
                response.headers_mut().insert("content-type", "application/json".parse().unwrap());
                response
            }
        }
    })
    .await
}

struct Llm {
    chain: Chain,
    gateway: Gateway,
    upstream: Upstream,
    release: mpsc::Sender<()>,
    seen_auth: Arc<Mutex<Vec<String>>>,
}

/// `None` when the test skips for want of anvil.
async fn llm() -> Option<Llm> {
    let (release, release_rx) = mpsc::channel(8);
    let seen_auth = Arc::new(Mutex::new(Vec::new()));
    let upstream = fake_openai(Arc::new(tokio::sync::Mutex::new(release_rx)), seen_auth.clone()).await;
    let chain = Chain::shared().await?;
    let chat = Route::free("/v1/chat/completions", "openai")
        .methods(&["POST"])
        .settle("before")
        .set("description", "Chat completion")
        .set("price", toml_value(r#"{ by = "body.model", table = { "gpt-4o-mini" = "$0.002", "gpt-4o" = "$0.02" } }"#))
        .set("catalogue", "/v1/models");
    let embeddings_price =
        r#"{ by = "body.model", table = { "text-embedding-3-small" = "$0.0001" }, default = "$0.001" }"#;
    let embeddings = Route::free("/v1/embeddings", "openai")
        .methods(&["POST"])
        .settle("after")
        .set("price", toml_value(embeddings_price))
        .set("catalogue", "/v1/models");
    let toml = GatewayToml::new()
        .listen()
        .server("max_body_bytes", 4096)
        .upstream("openai", &upstream.url())
        .upstream_header("openai", "Authorization", "Bearer ${T_OPENAI_KEY}")
        .payment(Payment::usdc())
        .route(chat)
        .route(embeddings)
        .network(chain.network())
        .build();
    let gateway = start_gateway_with_env(&toml, &[("T_OPENAI_KEY", OPERATOR_KEY)]).await;
    Some(Llm { chain, gateway, upstream, release, seen_auth })
}

fn post(url: &str, body: &Value, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut request = Request::post(url).header("content-type", "application/json");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

impl Llm {
    async fn challenge(&self, path: &str, body: &Value) -> Answer {
        send(&client(), post(&self.gateway.url(path), body, &[])).await
    }

    /// The `PAYMENT-SIGNATURE` for this exact body, from the challenge for this exact body.
    async fn payment(&self, path: &str, body: &Value, buyer: &PrivateKeySigner) -> String {
        let challenge = pay::decode_header(&self.challenge(path, body).await.headers["payment-required"]);
        let auth = Authorization::for_offer(buyer.address(), &challenge["accepts"][0]);
        pay::v2_header(&challenge["resource"], &challenge["accepts"][0], auth.sign(buyer))
    }
}

#[tokio::test]
async fn the_price_follows_the_model_and_the_challenge_is_deterministic() {
    let Some(m) = llm().await else { return };
    let mini = m.challenge("/v1/chat/completions", &json!({"model": "gpt-4o-mini", "messages": []})).await;
    let big = m.challenge("/v1/chat/completions", &json!({"model": "gpt-4o", "messages": []})).await;
    let (mini_offer, big_offer) =
        (pay::decode_header(&mini.headers["payment-required"]), pay::decode_header(&big.headers["payment-required"]));
    assert_eq!(mini_offer["accepts"][0]["amount"], "2000");
    assert_eq!(big_offer["accepts"][0]["amount"], "20000");
    assert_eq!(mini_offer["resource"]["description"], "Chat completion (gpt-4o-mini)");
    let again = m.challenge("/v1/chat/completions", &json!({"model": "gpt-4o-mini", "messages": []})).await;
    assert_eq!(again.headers["payment-required"], mini.headers["payment-required"]);
    assert_eq!(m.upstream.hits(), 0);
}

#[tokio::test]
async fn unknown_models_bad_bodies_and_big_bodies_are_refused_clearly() {
    let Some(m) = llm().await else { return };
    let unknown = m.challenge("/v1/chat/completions", &json!({"model": "o9-ultra"})).await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    assert_eq!(unknown.json()["error"], "unknown_price_key");
    let message = unknown.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("`o9-ultra`") && message.contains("gpt-4o, gpt-4o-mini"), "{message}");
    let missing = m.challenge("/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(missing.json()["message"].as_str().unwrap().contains("body.model is missing"));

    let defaulted = m.challenge("/v1/embeddings", &json!({"model": "some-other-embedder"})).await;
    assert_eq!(defaulted.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(pay::decode_header(&defaulted.headers["payment-required"])["accepts"][0]["amount"], "1000");

    let not_json = send(
        &client(),
        Request::post(m.gateway.url("/v1/chat/completions")).body(Full::new(Bytes::from("model=gpt-4o"))).unwrap(),
    )
    .await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
    assert_eq!(not_json.json()["error"], "invalid_body");
    let huge = m.challenge("/v1/chat/completions", &json!({"model": "gpt-4o", "pad": "x".repeat(5000)})).await;
    assert_eq!(huge.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(m.upstream.hits(), 0);
}

#[tokio::test]
async fn a_paid_stream_flows_event_by_event_with_the_operators_key_and_settles_once() {
    let logs = common::logs::captured();
    let Some(m) = llm().await else { return };
    let buyer = PrivateKeySigner::random();
    m.chain.mint(buyer.address(), 1_000_000).await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let payment = m.payment("/v1/chat/completions", &body, &buyer).await;
    let request = post(
        &m.gateway.url("/v1/chat/completions"),
        &body,
        &[("payment-signature", &payment), ("authorization", "Bearer buyer-own-key")],
    );
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(pay::decode_header(&response.headers()["payment-response"])["success"], true);
    let mut stream = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.frame())
        .await
        .expect("first chunk before the upstream sends the rest");
    let first = first.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("Hel"));
    m.release.send(()).await.unwrap();
    let mut rest = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), stream.frame()).await.unwrap() {
        rest.extend_from_slice(&frame.unwrap().into_data().unwrap_or_default());
    }
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));

    assert_eq!(
        m.chain.balance(PAY_TO.parse().unwrap()).await,
        U256::from(2000),
        "settled exactly once, at the model's price"
    );
    assert_eq!(
        *m.seen_auth.lock().unwrap(),
        vec![format!("Bearer {OPERATOR_KEY}")],
        "the buyer's own key never reached the upstream"
    );
    let log = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let line = log
        .lines()
        .find(|l| l.contains("usage") && l.contains(&buyer.address().to_string()))
        .expect("a usage line for this payment");
    for field in [
        "model=\"gpt-4o-mini\"",
        "amount=\"2000\"",
        "prompt_tokens=11",
        "completion_tokens=2",
        "complete=true",
        "transaction=\"0x",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
}

#[tokio::test]
async fn a_json_answer_is_settled_after_delivery_with_its_usage_logged() {
    let logs = common::logs::captured();
    let Some(m) = llm().await else { return };
    let buyer = PrivateKeySigner::random();
    m.chain.mint(buyer.address(), 1_000_000).await;
    let body = json!({"model": "text-embedding-3-small", "input": "hello"});
    let payment = m.payment("/v1/embeddings", &body, &buyer).await;
    let answer =
        send(&client(), post(&m.gateway.url("/v1/embeddings"), &body, &[("payment-signature", &payment)])).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["model"], "text-embedding-3-small");
    assert_eq!(m.chain.balance(PAY_TO.parse().unwrap()).await, U256::from(100));
    let log = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let line = log
        .lines()
        .find(|l| l.contains("usage") && l.contains(&buyer.address().to_string()))
        .expect("a usage line for this payment");
    assert!(line.contains("prompt_tokens=8") && line.contains("completion_tokens=0"), "{line}");
}

#[tokio::test]
async fn the_model_catalogue_is_free_and_lists_every_price() {
    let Some(m) = llm().await else { return };
    let answer = get(&m.gateway.url("/v1/models")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let list = answer.json();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]);
    let mini = &list["data"][1];
    assert_eq!(mini["object"], "model");
    assert_eq!(mini["x402"]["route"], "/v1/chat/completions");
    assert_eq!(mini["x402"]["accepts"][0]["amount"], "2000");
    assert_eq!(mini["x402"]["accepts"][0]["display"], "0.002 USDC");
    assert_eq!(m.upstream.hits(), 0);
}

#[tokio::test]
async fn the_catalogue_lists_per_token_models_with_their_rates_and_cap() {
    let Some(chain) = Chain::shared().await else { return };
    let upstream = spawn_echo("openai").await;
    let per_token = r#"{ by = "body.model", per_token = { "gpt-4o-mini" = { input = "$0.15/1M", output = "$0.60/1M" } }, max = "$0.25" }"#;
    let chat = Route::free("/v1/chat/completions", "openai")
        .methods(&["POST"])
        .set("description", "Chat completion")
        .set("price", toml_value(per_token))
        .set("catalogue", "/v1/models");
    let embeddings = Route::free("/v1/embeddings", "openai")
        .methods(&["POST"])
        .set("price", toml_value(r#"{ by = "body.model", table = { "text-embedding-3-small" = "$0.0001" } }"#))
        .set("catalogue", "/v1/models");
    let toml = GatewayToml::new()
        .listen()
        .upstream("openai", &upstream.url())
        .payment(Payment::usdc())
        .route(chat)
        .route(embeddings)
        .network(chain.network())
        .build();
    let gateway = start_gateway(&toml).await;
    let list = get(&gateway.url("/v1/models")).await.json();
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gpt-4o-mini", "text-embedding-3-small"]);
    let mini = &list["data"][0]["x402"];
    assert_eq!((mini["route"].as_str(), mini["scheme"].as_str()), (Some("/v1/chat/completions"), Some("upto")));
    assert_eq!(mini["pricing"], json!({ "input": "$0.15/1M", "output": "$0.60/1M", "max": "$0.25" }));
    let offer = &mini["accepts"][0];
    assert_eq!((offer["scheme"].as_str(), offer["symbol"].as_str()), (Some("upto"), Some("USDC")));
    assert_eq!((offer["inputPer1M"].as_str(), offer["outputPer1M"].as_str()), (Some("150000"), Some("600000")));
    assert_eq!(offer["max"], "250000");
    assert_eq!(
        offer["display"],
        "0.15 USDC per 1M input tokens, 0.6 USDC per 1M output tokens, at most 0.25 USDC a call"
    );
    assert_eq!(offer["payTo"], PAY_TO);
    // A price table's model keeps its shape.
    let small = &list["data"][1]["x402"];
    assert!(small.get("scheme").is_none() && small.get("pricing").is_none(), "{small}");
    assert_eq!(
        (small["accepts"][0]["scheme"].as_str(), small["accepts"][0]["amount"].as_str()),
        (Some("exact"), Some("100"))
    );
}
