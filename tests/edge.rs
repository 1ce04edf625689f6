//! The edge against hostile clients: connections that send nothing, stall or idle, one address taking every
//! connection, and the admin listener kept answering through it all. Real sockets on loopback.

mod common;

use bytes::Bytes;
use common::config::{toml_value, GatewayToml, Payment, Route};
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Generous: turns a hang into a failure, never measures anything.
const HANG: Duration = Duration::from_secs(15);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Plain, HTTPS (the dev certificate) and admin listeners, `/*` routed free to `upstream`.
fn edge_config(upstream: &str) -> GatewayToml {
    GatewayToml::new().listen().tls().admin().upstream("api", upstream).route(Route::free("/*", "api"))
}

/// The upstream `api` at `upstream` and `[payment]` in USDC, settled by `facilitator` if given; no route yet.
fn paid_api(upstream: &str, facilitator: Option<&str>) -> GatewayToml {
    let payment = Payment::usdc();
    let payment = match facilitator {
        Some(url) => payment.facilitator(url),
        None => payment,
    };
    GatewayToml::new().listen().upstream("api", upstream).payment(payment)
}

/// A facilitator on a closed port: nothing here gets past the 402.
const CLOSED_PORT: &str = "http://127.0.0.1:9";

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8 is this machine).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::from((from, 0))).expect("bind a loopback source address");
    tokio::time::timeout(HANG, socket.connect(to)).await.expect("connect in time").expect("connect")
}

/// Whether the peer closes `tcp` within `wait` (whatever it sends before).
async fn closed_within(tcp: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// One HTTP/1.1 request on `tcp`; the status line's code, or `None` if nothing came within `wait`.
async fn h1_status(tcp: &mut TcpStream, request: &[u8], wait: Duration) -> Option<u16> {
    tcp.write_all(request).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(wait, tcp.read(&mut buf)).await.ok()?.ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new(dev_ca_client_config()))
}

/// An HTTP/2 frame: length, type, flags, stream, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame").to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The client preface and an empty SETTINGS frame: an h2 connection, ready, that asks nothing.
fn h2_hello() -> Vec<u8> {
    [H2_PREFACE.to_vec(), h2_frame(0x4, 0, 0, &[])].concat()
}

#[tokio::test]
async fn silent_connections_of_every_kind_cannot_hold_the_cap_nor_the_admin_listener() {
    let echo = spawn_echo("api").await;
    let config = edge_config(&echo.url())
        .server("max_connections", 8)
        .server("max_connections_per_ip", 100)
        .server("header_read_timeout_secs", 1);
    let gw = start_gateway(&config.build()).await;
    let (http, https, admin) = (gw.http.unwrap(), gw.https.unwrap(), gw.admin.unwrap());

    // Eight connections fill the cap: two of each kind of silence.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(connect_from([127, 0, 0, 1], http).await);
        let mut half_preface = connect_from([127, 0, 0, 1], http).await;
        half_preface.write_all(&H2_PREFACE[..16]).await.unwrap();
        silent.push(half_preface);
        let mut h2_idle = connect_from([127, 0, 0, 1], http).await;
        h2_idle.write_all(&h2_hello()).await.unwrap();
        silent.push(h2_idle);
    }
    let mut tls_silent = Vec::new();
    for _ in 0..2 {
        let tcp = connect_from([127, 0, 0, 1], https).await;
        let name = ServerName::try_from("localhost").unwrap();
        tls_silent.push(tls_connector().connect(name, tcp).await.expect("TLS handshake, then nothing"));
    }
    // Let the gateway accept them all before the next one queues behind them.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let sent = Instant::now();
    let normal = tokio::spawn(async move {
        let mut tcp = connect_from([127, 0, 0, 1], http).await;
        h1_status(&mut tcp, b"GET /normal HTTP/1.1\r\nHost: edge\r\n\r\n", HANG).await
    });
    let health = tokio::time::timeout(HANG, get(&format!("http://{admin}/healthz"))).await.expect("healthz answers");
    assert_eq!(health.status, StatusCode::OK, "the admin listener has its own budget");
    assert_eq!(normal.await.unwrap(), Some(200));
    let waited = sent.elapsed();
    assert!(waited < Duration::from_secs(2), "answered within the header timeout plus a second: {waited:?}");

    for tcp in &mut silent {
        assert!(closed_within(tcp, Duration::from_secs(5)).await, "a silent connection is closed");
    }
    for tls in &mut tls_silent {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a silent TLS connection is closed: {read:?}");
    }
    assert_eq!(echo.hits(), 1);
}

#[tokio::test]
async fn one_address_cannot_take_more_than_its_share_of_connections() {
    let echo = spawn_echo("api").await;
    let gw = start_gateway(&edge_config(&echo.url()).server("max_connections_per_ip", 2).build()).await;
    let http = gw.http.unwrap();
    let request = b"GET /x HTTP/1.1\r\nHost: edge\r\n\r\n";
    let mut first = connect_from([127, 0, 0, 2], http).await;
    let mut second = connect_from([127, 0, 0, 2], http).await;
    assert_eq!(h1_status(&mut first, request, HANG).await, Some(200));
    assert_eq!(h1_status(&mut second, request, HANG).await, Some(200));

    let mut third = connect_from([127, 0, 0, 2], http).await;
    assert!(closed_within(&mut third, HANG).await, "a third connection from the same address is closed");
    let mut elsewhere = connect_from([127, 0, 0, 3], http).await;
    assert_eq!(h1_status(&mut elsewhere, request, HANG).await, Some(200), "another address is served");

    // A slot freed by a close is the address's again.
    drop(first);
    let served_again = async {
        loop {
            let mut again = connect_from([127, 0, 0, 2], http).await;
            if h1_status(&mut again, request, Duration::from_secs(1)).await == Some(200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(HANG, served_again).await.expect("served once one of its connections closed");
    assert_eq!(echo.hits(), 4);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_in_both_protocols() {
    let echo = spawn_echo("api").await;
    let config = edge_config(&echo.url()).server("idle_timeout_secs", 1).server("header_read_timeout_secs", 5);
    let gw = start_gateway(&config.build()).await;
    let http = gw.http.unwrap();

    let mut h1 = connect_from([127, 0, 0, 1], http).await;
    assert_eq!(h1_status(&mut h1, b"GET /one HTTP/1.1\r\nHost: edge\r\n\r\n", HANG).await, Some(200));
    // A real h2 client, which answers the pings of a graceful close.
    let tcp = connect_from([127, 0, 0, 1], http).await;
    let (mut h2, h2_connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.expect("h2 handshake");
    let h2_connection = tokio::spawn(h2_connection);
    let request = http::Request::get(format!("http://{http}/two")).body(Empty::<Bytes>::new()).unwrap();
    let answer = tokio::time::timeout(HANG, h2.send_request(request)).await.expect("in time").expect("h2 answer");
    assert_eq!(answer.status(), StatusCode::OK);
    answer.into_body().collect().await.expect("body");

    let started = Instant::now();
    assert!(closed_within(&mut h1, HANG).await, "an idle HTTP/1.1 connection is closed");
    let ended = tokio::time::timeout(HANG, h2_connection).await.expect("the idle h2 connection is closed");
    assert!(ended.expect("task").is_ok(), "closed gracefully (GOAWAY), not torn down");
    // Closed for idling, not by the header timeout: both went well before it.
    assert!(started.elapsed() < Duration::from_secs(4), "closed after {:?}", started.elapsed());
    assert_eq!(echo.hits(), 2);
}

/// The kinds of the HTTP/2 frames the peer sends on `tcp` until it closes it, or `None` if it is still open
/// after `wait`.
async fn h2_frames_until_closed(tcp: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + wait;
    let (mut received, mut kinds) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
    let mut at = 0;
    while let Some(header) = received.get(at..at + 9) {
        let length = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        kinds.push(header[3]);
        at += 9 + length;
    }
    Some(kinds)
}

#[tokio::test]
async fn an_idle_h2_peer_that_never_lets_the_graceful_close_finish_is_cut_off() {
    let echo = spawn_echo("api").await;
    let config = edge_config(&echo.url()).server("idle_timeout_secs", 1).server("h2_keepalive_secs", 3600);
    let gw = start_gateway(&config.build()).await;
    let mut h2 = connect_from([127, 0, 0, 1], gw.http.unwrap()).await;
    h2.write_all(&h2_hello()).await.unwrap();
    let head = [0x82, 0x86, 0x84, 0x41, 0x01, b'x'];
    h2.write_all(&h2_frame(0x1, 0x4 | 0x1, 1, &head)).await.unwrap();
    // Answered, then idle: the gateway says GOAWAY and pings, and this client never acknowledges the ping,
    // which would keep a graceful close waiting forever.
    let started = Instant::now();
    let kinds = h2_frames_until_closed(&mut h2, HANG).await.expect("the connection is cut off");
    assert!(kinds.contains(&0x7), "a GOAWAY came first: {kinds:?}");
    assert!(started.elapsed() >= Duration::from_secs(5), "cut off after the grace: {:?}", started.elapsed());
    assert_eq!(echo.hits(), 1);
}

#[tokio::test]
async fn a_long_answer_keeps_its_connection_however_long_it_streams() {
    // Eight chunks, 0.9 s apart: the answer outlasts the idle time and the grace of a close several times.
    let streaming = spawn_upstream(|_req| async {
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, x402_gateway::proxy::body::BoxError>::new(1);
        tokio::spawn(async move {
            for i in 0..8u8 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                if tx.send_data(Bytes::from(vec![b'0' + i])).await.is_err() {
                    return;
                }
            }
        });
        http::Response::new(body.boxed_unsync())
    })
    .await;
    let gw = start_gateway(&edge_config(&streaming.url()).server("idle_timeout_secs", 1).build()).await;
    let answer = tokio::time::timeout(HANG, get(&gw.url("/stream"))).await.expect("the stream ends in time");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "01234567", "the whole stream, not cut as an idle connection");
}

#[tokio::test]
async fn an_h2_peer_that_stops_answering_pings_is_cut_off_while_its_request_waits() {
    // An upstream that never answers: the request stays in flight, so only the pings can end the connection.
    let stuck = spawn_upstream(|_req| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        http::Response::new(x402_gateway::proxy::body::full("never"))
    })
    .await;
    let config = edge_config(&stuck.url())
        .server("h2_keepalive_secs", 1)
        .server("header_read_timeout_secs", 1)
        .server("idle_timeout_secs", 3600);
    let gw = start_gateway(&config.build()).await;
    let mut h2 = connect_from([127, 0, 0, 1], gw.http.unwrap()).await;
    h2.write_all(&h2_hello()).await.unwrap();
    let head = [0x82, 0x86, 0x84, 0x41, 0x01, b'x'];
    h2.write_all(&h2_frame(0x1, 0x4 | 0x1, 1, &head)).await.unwrap();
    let reached = async {
        while stuck.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(HANG, reached).await.expect("the request reaches the upstream");
    // This client reads frames but never acknowledges a PING.
    assert!(closed_within(&mut h2, HANG).await, "the connection is closed once a ping goes unanswered");
}

/// A route priced by its body's `model` (so its body is read whole before the 402), settled by a facilitator
/// on a closed port.
fn body_priced(upstream: &str) -> GatewayToml {
    let price = toml_value(r#"{ by = "body.model", table = { cheap = "$0.001" } }"#);
    paid_api(upstream, Some(CLOSED_PORT)).route(Route::free("/chat", "api").set("price", price))
}

#[tokio::test]
async fn a_body_read_for_pricing_that_stalls_is_cut_at_its_deadline() {
    let echo = spawn_echo("api").await;
    let gw = start_gateway(&body_priced(&echo.url()).server("body_read_timeout_secs", 1).build()).await;
    let mut tcp = connect_from([127, 0, 0, 1], gw.http.unwrap()).await;
    let started = Instant::now();
    let head = b"POST /chat HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let status = h1_status(&mut tcp, &[&head[..], b"{\"model\":"].concat(), HANG).await;
    assert_eq!(status, Some(408));
    assert!(started.elapsed() >= Duration::from_millis(900), "cut by the deadline: {:?}", started.elapsed());

    // A chunked body that trickles is cut the same way.
    let tcp = connect_from([127, 0, 0, 1], gw.http.unwrap()).await;
    let (mut reader, mut writer) = tcp.into_split();
    let head = b"POST /chat HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\n\r\n";
    writer.write_all(head).await.unwrap();
    let trickle = async {
        for _ in 0..40 {
            if writer.write_all(b"1\r\n \r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut buf = vec![0u8; 1024];
    let (_, read) = tokio::join!(trickle, tokio::time::timeout(HANG, reader.read(&mut buf)));
    let n = read.expect("an answer").expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&buf[..n]));
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn bodies_beyond_the_buffer_budget_are_refused_with_503_while_others_are_served() {
    let echo = spawn_echo("api").await;
    let config = body_priced(&echo.url())
        .server("max_body_bytes", 1_000_000)
        .server("max_buffered_body_bytes", 1_500_000)
        .server("body_read_timeout_secs", 30);
    let gw = start_gateway(&config.build()).await;
    let http = gw.http.unwrap();
    // One body of 1 MB declared and held half-sent takes most of the budget...
    let mut holder = connect_from([127, 0, 0, 1], http).await;
    let head = "POST /chat HTTP/1.1\r\nHost: edge\r\nContent-Length: 1000000\r\n\r\n";
    holder.write_all(head.as_bytes()).await.unwrap();
    holder.write_all(&vec![b' '; 500_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so a second such body does not fit: 503 with Retry-After, before any of it is read.
    let mut second = connect_from([127, 0, 0, 1], http).await;
    second.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(HANG, second.read(&mut buf)).await.expect("answered").expect("read");
    let answer = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1") && answer.contains("server_busy"), "{answer}");
    // A small priced body still fits, and gets its 402; free routes are not affected at all.
    let small = br#"{"model":"cheap"}"#;
    let request = format!("POST /chat HTTP/1.1\r\nHost: edge\r\nContent-Length: {}\r\n\r\n", small.len());
    let mut third = connect_from([127, 0, 0, 1], http).await;
    assert_eq!(h1_status(&mut third, &[request.as_bytes(), small].concat(), HANG).await, Some(402));
    drop(holder);
}

/// Sends `request` (raw HTTP/1.1 bytes, asking the gateway to close) on a new connection; the whole answer.
async fn raw_exchange(to: SocketAddr, request: &[u8]) -> String {
    let mut tcp = connect_from([127, 0, 0, 1], to).await;
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG, tcp.read_to_end(&mut answer)).await.expect("the answer ends in time");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_paid_path_is_never_served_free_for_another_method() {
    let echo = spawn_echo("api").await;
    let toml = paid_api(&echo.url(), Some(CLOSED_PORT))
        .route(Route::priced("/premium/*", "api", "$0.001").methods(&["GET"]))
        .route(Route::free("/premium/reports", "api").methods(&["GET", "PUT"]))
        .route(Route::free("/premium/reports", "api").methods(&["PUT", "DELETE"]))
        .route(Route::free("/*", "api"));
    let gw = start_gateway(&toml.build()).await;
    let http = gw.http.unwrap();

    let post = raw_exchange(
        http,
        b"POST /premium/report HTTP/1.1\r\nHost: edge\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(post.to_lowercase().contains("\r\nallow: get\r\n"), "{post}");
    // The free catch-all still serves what no paid route matches.
    let other =
        raw_exchange(http, b"POST /other HTTP/1.1\r\nHost: edge\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    // Allow lists each method once, in order.
    let patch = raw_exchange(
        http,
        b"PATCH /premium/reports HTTP/1.1\r\nHost: edge\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(patch.starts_with("HTTP/1.1 405"), "{patch}");
    assert!(patch.to_lowercase().contains("\r\nallow: delete, get, put\r\n"), "{patch}");
    // TRACE would echo the operator's credentials: refused unless a route lists it, like CONNECT.
    let trace = raw_exchange(http, b"TRACE /other HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n").await;
    assert!(trace.starts_with("HTTP/1.1 405"), "{trace}");
    assert!(!trace.to_lowercase().contains("trace"), "TRACE is not allowed: {trace}");
    assert_eq!(echo.hits(), 1);
}

#[tokio::test]
async fn method_override_headers_reach_only_routes_that_allow_them() {
    let echo = spawn_echo("api").await;
    let toml = paid_api(&echo.url(), None)
        .route(Route::free("/override/*", "api").set("forward_method_override", true))
        .route(Route::free("/*", "api"));
    let gw = start_gateway(&toml.build()).await;
    let http = gw.http.unwrap();
    let request = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: edge\r\nX-HTTP-Method-Override: GET\r\nX-HTTP-Method: GET\r\n\
             X-Method-Override: GET\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let dropped = raw_exchange(http, request("/premium/report").as_bytes()).await;
    assert!(dropped.starts_with("HTTP/1.1 200"), "{dropped}");
    for name in ["x-http-method-override", "x-http-method", "x-method-override"] {
        assert!(!dropped.contains(&format!("\"{name}\"")), "{name} forwarded: {dropped}");
    }
    let kept = raw_exchange(http, request("/override/x").as_bytes()).await;
    assert!(kept.contains("\"x-http-method-override\":\"GET\""), "{kept}");
}

#[tokio::test]
async fn a_price_key_sent_twice_or_recased_is_refused_and_nothing_is_forwarded() {
    let echo = spawn_echo("api").await;
    let price = toml_value(r#"{ by = "body.model", table = { cheap = "$0.001", dear = "$1" }, default = "$0.001" }"#);
    let toml = paid_api(&echo.url(), Some(CLOSED_PORT)).route(Route::free("/chat", "api").set("price", price));
    let gw = start_gateway(&toml.build()).await;
    for body in [
        r#"{"model":"cheap","MODEL":"dear"}"#,
        r#"{"model":"cheap","model":"dear"}"#,
        r#"{"Model":"dear"}"#,
        r#"{"model":"cheap","mod\u0065l":"dear"}"#,
    ] {
        let request = format!("POST /chat HTTP/1.1\r\nHost: edge\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let answer = raw_exchange_keep(gw.http.unwrap(), request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{body}: {answer}");
        assert!(answer.contains("ambiguous_price_key"), "{body}: {answer}");
    }
    let plain = r#"{"model":"cheap"}"#;
    let request = format!("POST /chat HTTP/1.1\r\nHost: edge\r\nContent-Length: {}\r\n\r\n{plain}", plain.len());
    assert!(raw_exchange_keep(gw.http.unwrap(), request.as_bytes()).await.starts_with("HTTP/1.1 402"));
    assert_eq!(echo.hits(), 0);
}

/// Like `raw_exchange`, for answers on a kept-alive connection: the head and what came with it.
async fn raw_exchange_keep(to: SocketAddr, request: &[u8]) -> String {
    let mut tcp = connect_from([127, 0, 0, 1], to).await;
    tcp.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(HANG, tcp.read(&mut buf)).await.expect("an answer").expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn a_malformed_body_from_the_client_is_its_own_400_not_an_upstream_failure() {
    let echo = spawn_echo("api").await;
    let gw = start_gateway(&edge_config(&echo.url()).build()).await;
    let request = b"POST /free HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
    let answer = raw_exchange_keep(gw.http.unwrap(), request).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_body"), "{answer}");
}

/// A paid GET `/paid` settled by the remote facilitator at `facilitator`, with `attempt_limits` (per-address
/// rate and burst) in `[payment]` if given.
async fn remote_paid_gateway(
    upstream: &Upstream,
    facilitator: &Upstream,
    attempt_limits: Option<(i64, i64)>,
) -> Gateway {
    let payment = Payment::usdc().facilitator(&facilitator.url());
    let payment = match attempt_limits {
        Some((rate, burst)) => payment.set("attempt_rate_per_ip", rate).set("attempt_burst_per_ip", burst),
        None => payment,
    };
    let toml = GatewayToml::new()
        .listen()
        .admin()
        .upstream("api", &upstream.url())
        .payment(payment)
        .route(Route::priced("/paid", "api", "$0.001"));
    start_gateway(&toml.build()).await
}

/// The v2 offer of an unpaid call: (resource, accepts[0]).
async fn offer_of(gw: &Gateway, path: &str) -> (serde_json::Value, serde_json::Value) {
    let answer = get(&gw.url(path)).await;
    assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
    let challenge = pay::decode_header(&answer.headers["payment-required"]);
    (challenge["resource"].clone(), challenge["accepts"][0].clone())
}

async fn pay_with(gw: &Gateway, path: &str, header: &str) -> Answer {
    let request = http::Request::get(gw.url(path)).header("payment-signature", header).body(Default::default());
    send(&client(), request.unwrap()).await
}

/// A facilitator that records the path of every call and answers nothing useful.
async fn recording_facilitator() -> (Upstream, Arc<std::sync::Mutex<Vec<String>>>) {
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = calls.clone();
    let facilitator = spawn_upstream(move |request| {
        recorded.lock().unwrap().push(request.uri().path().to_string());
        async { http::Response::new(x402_gateway::proxy::body::full("{}")) }
    })
    .await;
    (facilitator, calls)
}

#[tokio::test]
async fn in_remote_mode_a_payment_that_fails_offline_checks_never_reaches_the_facilitator() {
    let echo = spawn_echo("api").await;
    let (facilitator, calls) = recording_facilitator().await;
    let gw = remote_paid_gateway(&echo, &facilitator, None).await;
    let (resource, accepted) = offer_of(&gw, "/paid").await;
    let buyer = alloy::signers::local::PrivateKeySigner::random();
    type Tamper = fn(&mut pay::Authorization);
    let tampered: [(&str, Tamper); 4] = [
        ("amount", |a| a.message.value += alloy::primitives::U256::from(1)),
        ("payee", |a| a.message.to = alloy::primitives::Address::repeat_byte(7)),
        ("time window", |a| a.message.validBefore = alloy::primitives::U256::from(pay::now() - 1)),
        ("signature domain", |a| a.domain_name = "Not USDC".into()),
    ];
    for (what, tamper) in tampered {
        let mut authorization = pay::Authorization::for_offer(buyer.address(), &accepted);
        tamper(&mut authorization);
        let answer = pay_with(&gw, "/paid", &pay::v2_header(&resource, &accepted, authorization.sign(&buyer))).await;
        assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED, "{what}: {}", answer.text());
    }
    let forged = pay::Authorization::for_offer(buyer.address(), &accepted)
        .payload_with_signature(&format!("0x{}", "11".repeat(65)));
    let answer = pay_with(&gw, "/paid", &pay::v2_header(&resource, &accepted, forged)).await;
    assert!(answer.status.is_client_error(), "a forged signature: {}", answer.status);
    let calls = calls.lock().unwrap().clone();
    assert!(calls.iter().all(|path| path == "/supported"), "garbage left the box: {calls:?}");
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn payment_attempts_beyond_the_per_address_rate_get_429_with_retry_after() {
    let echo = spawn_echo("api").await;
    let facilitator = spawn_echo("facilitator").await;
    let gw = remote_paid_gateway(&echo, &facilitator, Some((1, 3))).await;
    let (resource, accepted) = offer_of(&gw, "/paid").await;
    let buyer = alloy::signers::local::PrivateKeySigner::random();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..5 {
        // Signed for another payee: refused offline, but each one is an attempt.
        let mut authorization = pay::Authorization::for_offer(buyer.address(), &accepted);
        authorization.message.to = alloy::primitives::Address::repeat_byte(7);
        let answer = pay_with(&gw, "/paid", &pay::v2_header(&resource, &accepted, authorization.sign(&buyer))).await;
        statuses.push(answer.status.as_u16());
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(answer.json()["error"], "too_many_payment_attempts");
            retry_after = answer.headers.get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
        }
    }
    assert_eq!(statuses[..3], [402, 402, 402], "the burst");
    assert_eq!(statuses[3..], [429, 429], "beyond it");
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Unpaid requests are not attempts: the 402 challenge is always served.
    assert_eq!(get(&gw.url("/paid")).await.status, StatusCode::PAYMENT_REQUIRED);
    let admin = gw.admin.expect("admin listener");
    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    let counted = metrics.lines().find(|l| l.contains("payments_rejected") && l.contains("too_many_payment_attempts"));
    assert!(counted.is_some_and(|line| line.ends_with(" 2")), "{metrics}");
}
