//! Failures and limits: unreachable and slow upstreams, oversized bodies and heads, graceful shutdown, and the
//! admin listener kept apart from public traffic. Real sockets on loopback.

mod common;

use bytes::Bytes;
use common::config::{GatewayToml, Route};
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use x402_gateway::proxy::body::full;

/// Generous: turns a hang into a failure, never measures anything.
const HANG: Duration = Duration::from_secs(15);

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(HANG, future).await.unwrap_or_else(|_| panic!("{what}: no result within {HANG:?}"))
}

/// `/api/*` routed free to the upstream `api` at `url`.
fn api_at(url: &str) -> GatewayToml {
    GatewayToml::new().listen().upstream("api", url).route(Route::free("/api/*", "api"))
}

#[tokio::test]
async fn unreachable_upstream_is_502_without_internal_details() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to free");
        listener.local_addr().expect("local addr").port()
    };
    let secret = "op-secret-5e81c2d7";
    let toml =
        api_at(&format!("http://127.0.0.1:{port}")).upstream_header("api", "Authorization", "Bearer ${T_KEY}").build();
    let gw = start_gateway_with_env(&toml, &[("T_KEY", secret)]).await;
    let answer = within("request", get(&gw.url("/api/thing"))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.json()["error"], "upstream_unavailable");
    let body = answer.text();
    assert!(!body.contains(&port.to_string()), "the upstream's port leaked: {body}");
    assert!(!body.contains("127.0.0.1"), "the upstream's address leaked: {body}");
    assert!(!body.contains(secret), "the operator's secret leaked: {body}");
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let slow = spawn_upstream(|_req| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Response::new(full("too late"))
    })
    .await;
    let toml = api_at(&slow.url()).upstream_setting("api", "timeout_secs", 1).build();
    let gw = start_gateway(&toml).await;
    let answer = within("request", get(&gw.url("/api/slow"))).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.json()["error"], "upstream_timeout");
    assert_eq!(slow.hits(), 1, "the request did reach the slow upstream");
}

#[tokio::test]
async fn declared_oversized_body_is_413_before_the_upstream() {
    let echo = spawn_echo("echo").await;
    let toml = api_at(&echo.url()).server("max_body_bytes", 1024).build();
    let gw = start_gateway(&toml).await;
    let request =
        Request::post(gw.url("/api/upload")).body(Full::new(Bytes::from(vec![b'x'; 2048]))).expect("valid request");
    let answer = within("request", send(&client(), request)).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.json()["error"], "body_too_large");
    assert_eq!(echo.hits(), 0, "a declared oversized body never reaches the upstream");
}

#[tokio::test]
async fn streamed_oversized_body_is_413() {
    let echo = spawn_echo("echo").await;
    let toml = api_at(&echo.url()).server("max_body_bytes", 1024).build();
    let gw = start_gateway(&toml).await;
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(8);
    tokio::spawn(async move {
        for _ in 0..4 {
            if tx.send_data(Bytes::from(vec![b'y'; 1024])).await.is_err() {
                return;
            }
        }
    });
    let client: Client<HttpConnector, Channel<Bytes, Infallible>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let request = Request::post(gw.url("/api/stream")).body(body).expect("valid request");
    let response = within("request", client.request(request)).await.expect("an answer to the streamed request");
    let status = response.status();
    let body = within("body", response.into_body().collect()).await.expect("response body").to_bytes();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&body));
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON error body");
    assert_eq!(json["error"], "body_too_large");
}

#[tokio::test]
async fn body_under_the_limit_passes_whole() {
    let echo = spawn_echo("echo").await;
    let toml = api_at(&echo.url()).server("max_body_bytes", 1024).build();
    let gw = start_gateway(&toml).await;
    let request =
        Request::post(gw.url("/api/upload")).body(Full::new(Bytes::from(vec![b'z'; 1000]))).expect("valid request");
    let answer = within("request", send(&client(), request)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["body_len"], 1000);
    assert_eq!(echo.hits(), 1);
}

#[tokio::test]
async fn oversized_request_head_is_431_before_the_upstream() {
    let echo = spawn_echo("echo").await;
    let toml = api_at(&echo.url()).server("max_header_bytes", 8192).build();
    let gw = start_gateway(&toml).await;
    let request = Request::get(gw.url("/api/big-head"))
        .header("x-big", "h".repeat(20 * 1024))
        .body(Full::default())
        .expect("valid request");
    let answer = within("request", send(&client(), request)).await;
    assert_eq!(answer.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(echo.hits(), 0, "an oversized head never reaches the upstream");
}

#[tokio::test]
async fn shutdown_closes_the_listener_at_once_and_lets_the_in_flight_request_finish() {
    let (arrived_tx, mut arrived_rx) = mpsc::channel::<()>(1);
    let slow = spawn_upstream(move |_req| {
        let arrived_tx = arrived_tx.clone();
        async move {
            let _ = arrived_tx.send(()).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            Response::new(full("finished"))
        }
    })
    .await;
    let toml = api_at(&slow.url()).build();
    let mut gw = start_gateway(&toml).await;
    let addr = gw.http.expect("plain listener");
    let url = gw.url("/api/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    within("the request reaching the upstream", arrived_rx.recv()).await.expect("upstream handler ran");

    let stopped = gw.shutdown();
    // The listener closes at once, not after the grace period: nobody would serve what it accepted.
    let closed = async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    within("the listener closing", closed).await;
    assert!(!in_flight.is_finished(), "the listener closed only after the in-flight request finished");
    let answer = within("the in-flight request", in_flight).await.expect("request task");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "finished");
    within("the server stopping", stopped).await.expect("server task ended without panicking");

    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "the listener on {addr} still accepts connections after shutdown");
}

#[tokio::test]
async fn health_is_served_on_the_admin_listener_only() {
    let echo = spawn_echo("echo").await;
    let toml = api_at(&echo.url()).admin().build();
    let gw = start_gateway(&toml).await;
    let admin = gw.admin.expect("admin listener bound");
    assert_ne!(Some(admin), gw.http, "admin and public listeners differ");

    let health = within("admin healthz", get(&format!("http://{admin}/healthz"))).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json()["status"], "ok");

    let public = within("public healthz", get(&gw.url("/healthz"))).await;
    assert_eq!(public.status, StatusCode::NOT_FOUND);
    assert_eq!(public.json()["error"], "no_route");

    let proxied_on_admin = within("admin api", get(&format!("http://{admin}/api/x"))).await;
    assert_eq!(proxied_on_admin.status, StatusCode::NOT_FOUND, "the admin listener does not proxy");
    assert_eq!(echo.hits(), 0);
}

/// Everything routed free to the upstream `api` at `url`.
fn catch_all(url: &str) -> GatewayToml {
    GatewayToml::new().listen().upstream("api", url).route(Route::free("/*", "api"))
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = spawn_echo("api").await;
    let gw = start_gateway(&catch_all(&echo.url()).server("header_read_timeout_secs", 1).build()).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.http.expect("listener")).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\n").await.expect("half a head");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the gateway closes a connection whose head does not arrive in time");
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = spawn_echo("api").await;
    let gw = start_gateway(&catch_all(&echo.url()).server("max_connections", 2).build()).await;
    let addr = gw.http.expect("listener");
    let request = b"GET /x HTTP/1.1\r\nHost: cap\r\n\r\n";
    async fn answered(tcp: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 1024];
        matches!(tokio::time::timeout(wait, tcp.read(&mut buf)).await, Ok(Ok(n)) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
    }
    // Two keep-alive connections take both slots.
    let mut first = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
    for tcp in [&mut first, &mut second] {
        tcp.write_all(request).await.expect("send");
        assert!(answered(tcp, Duration::from_secs(10)).await);
    }
    // A third waits, unserved, while they stay open...
    let mut third = tokio::net::TcpStream::connect(addr).await.expect("the kernel backlog takes it");
    third.write_all(request).await.expect("send");
    assert!(!answered(&mut third, Duration::from_millis(500)).await, "served beyond max_connections");
    // ...and is served as soon as one of them closes.
    drop(first);
    assert!(answered(&mut third, Duration::from_secs(10)).await, "served once a slot is free");
}

#[tokio::test]
async fn the_worker_count_is_checked_at_start_and_one_worker_serves() {
    let echo = spawn_echo("api").await;
    let gw = start_gateway(&catch_all(&echo.url()).server("workers", 1).build()).await;
    let answer = within("a request on one worker", get(&gw.url("/x"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(echo.hits(), 1);
    for (workers, why) in [(0, "greater than zero"), (5000, "at most 1024")] {
        let toml = catch_all(&echo.url()).server("workers", workers).build();
        let parsed = x402_gateway::config::Config::parse(&toml, "g.toml".as_ref(), ".".as_ref(), &|_| None);
        let err = parsed.map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("server.workers") && err.contains(why), "{err}");
    }
}
