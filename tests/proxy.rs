//! The foundation: routing, credential injection, header hygiene, streaming, failures and limits,
//! through real sockets on loopback.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn toml_with(upstreams: &[(&str, &str)], routes: &str) -> String {
    let mut toml = String::from("[server]\nlisten = \"127.0.0.1:0\"\n");
    for (name, url) in upstreams {
        toml.push_str(&format!("[upstreams.{name}]\nurl = \"{url}\"\n"));
    }
    toml.push_str(routes);
    toml
}

#[tokio::test]
async fn most_specific_route_wins() {
    let (catch_all, prefix, exact, named, named_fixed) = (
        spawn_echo("catch-all").await,
        spawn_echo("prefix").await,
        spawn_echo("exact").await,
        spawn_echo("named").await,
        spawn_echo("named-fixed").await,
    );
    let toml = toml_with(
        &[
            ("catch_all", &catch_all.url()),
            ("prefix", &prefix.url()),
            ("exact", &exact.url()),
            ("named", &named.url()),
            ("named_fixed", &named_fixed.url()),
        ],
        r#"
[[routes]]
path = "/*"
upstream = "catch_all"
[[routes]]
path = "/public/*"
upstream = "prefix"
[[routes]]
path = "/users/:id/*"
upstream = "prefix"
[[routes]]
path = "/public/special"
upstream = "exact"
[[routes]]
path = "/users/:id"
upstream = "named"
[[routes]]
path = "/users/me"
upstream = "named_fixed"
"#,
    );
    let gw = start_gateway(&toml).await;
    for (path, expected) in [
        ("/", "catch-all"),
        ("/elsewhere/x", "catch-all"),
        ("/public", "prefix"),
        ("/public/a/b", "prefix"),
        ("/public/special", "exact"),
        ("/PUBLIC/Special", "exact"),
        ("//public//special", "exact"),
        ("/public/%73pecial", "exact"),
        ("/public/special/deeper", "prefix"),
        ("/users/42", "named"),
        ("/users/me", "named-fixed"),
        ("/users/42/posts", "prefix"),
    ] {
        let answer = get(&gw.url(path)).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
        assert_eq!(answer.json()["upstream"], expected, "{path}");
    }
}

#[tokio::test]
async fn no_route_is_404_json_and_wrong_method_is_405() {
    let echo = spawn_echo("echo").await;
    let toml = toml_with(
        &[("echo", &echo.url())],
        "[[routes]]\npath = \"/only\"\nmethods = [\"GET\", \"head\"]\nupstream = \"echo\"\n",
    );
    let gw = start_gateway(&toml).await;
    let missing = get(&gw.url("/nowhere")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["error"], "no_route");
    let post = send(&client(), Request::post(gw.url("/only")).body(Full::default()).unwrap()).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers["allow"], "GET, HEAD");
    let dots = get(&gw.url("/only/%2e%2e/only")).await;
    assert_eq!(dots.status, StatusCode::BAD_REQUEST);
    assert_eq!(dots.json()["error"], "invalid_path");
    assert_eq!(echo.hits(), 0, "refused requests never reach the upstream");
}

#[tokio::test]
async fn operator_credentials_replace_client_copies() {
    let echo = spawn_echo("echo").await;
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:0"
[upstreams.echo]
url = "{}/base/"
headers = {{ Authorization = "Bearer ${{T_PROXY_KEY}}", "X-Team" = "sellers" }}
query = {{ api_key = "${{T_PROXY_KEY}}" }}
[[routes]]
path = "/public/*"
upstream = "echo"
strip_prefix = "/public"
"#,
        echo.url()
    );
    let gw = start_gateway_with_env(&toml, &[("T_PROXY_KEY", "op-secret")]).await;
    let request = Request::get(gw.url("/public/a/b?q=1&api_key=stolen"))
        .header("authorization", "Bearer client-forged")
        .header("x-team", "buyers")
        .header("connection", "x-hop")
        .header("x-hop", "must-not-pass")
        .header("x-forwarded-for", "10.9.9.9")
        .header("host", "shop.example")
        .body(Full::default())
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::OK);
    let echo_json = answer.json();
    let headers = &echo_json["headers"];
    assert_eq!(echo_json["path"], "/base/a/b", "strip_prefix then the upstream's base path");
    assert_eq!(echo_json["query"], "q=1&api_key=op-secret");
    assert_eq!(headers["authorization"], "Bearer op-secret");
    assert_eq!(headers["x-team"], "sellers");
    assert!(headers.get("x-hop").is_none(), "headers named in Connection are hop-by-hop");
    assert!(headers.get("connection").is_none());
    assert_eq!(headers["host"], echo.addr.to_string());
    assert_eq!(headers["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "shop.example");
}

/// The shipped gateway.toml with its credential-injection lines uncommented, as the README says to.
fn shipped_config_with_the_injection_demo() -> String {
    let shipped = std::fs::read_to_string(repo_path("gateway.toml")).unwrap();
    let mut uncommenting = false;
    let mut toml = String::new();
    for line in shipped.lines() {
        uncommenting = line == "# [upstreams.myapi]" || (uncommenting && line.starts_with("# "));
        toml.push_str(if uncommenting { &line[2..] } else { line });
        toml.push('\n');
    }
    toml
}

#[tokio::test]
async fn the_shipped_credential_injection_demo_shows_the_operators_key_replacing_the_buyers() {
    let stand_in = spawn_echo("myapi").await;
    let mut toml = shipped_config_with_the_injection_demo();
    assert!(toml.contains("\n[upstreams.myapi]\n") && toml.contains("\nupstream = \"myapi\""), "{toml}");
    // Loopback only: ports the kernel picks, the test's echo server standing in for examples/echo_upstream.rs
    // on 127.0.0.1:9000, the repository's dev certificate, and no public facilitator.
    let certs = format!("\"{}/certs/", repo_path("").display());
    for (from, to) in [
        ("127.0.0.1:8402", "127.0.0.1:0"),
        ("127.0.0.1:8443", "127.0.0.1:0"),
        ("127.0.0.1:9402", "127.0.0.1:0"),
        ("http://127.0.0.1:9000", stand_in.url().as_str()),
        ("\"certs/", certs.as_str()),
        ("https://x402.org/facilitator", "http://127.0.0.1:9"),
    ] {
        assert!(toml.contains(from), "gateway.toml no longer has {from}");
        toml = toml.replace(from, to);
    }
    let env = [("MY_API_KEY", "operator-secret"), ("PAY_TO", "0x1111111111111111111111111111111111111111")];
    let gw = start_gateway_with_env(&toml, &env).await;
    // The README's call: the buyer sends a key of its own, in the header and in the query.
    let request = Request::get(gw.url("/myapi/hello?api_key=buyer-key"))
        .header("authorization", "Bearer buyer-key")
        .body(Full::default())
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let echo = answer.json();
    assert_eq!((&echo["upstream"], &echo["path"]), (&"myapi".into(), &"/hello".into()));
    assert_eq!(echo["headers"]["authorization"], "Bearer operator-secret");
    assert_eq!(echo["headers"]["x-team"], "sellers");
    assert_eq!(echo["query"], "api_key=operator-secret");
}

#[tokio::test]
async fn the_upstream_gets_the_canonical_path_and_the_clients_query() {
    let echo = spawn_echo("echo").await;
    let toml = toml_with(&[("echo", &echo.url())], "[[routes]]\npath = \"/*\"\nupstream = \"echo\"\n");
    let gw = start_gateway(&toml).await;
    for (asked, path, query) in [
        ("/a/b?x=1%20y&z", "/a/b", "x=1%20y&z"),
        ("/a/b/", "/a/b/", ""),
        ("//a//b?x=1", "/a/b", "x=1"),
        ("/%61/caf%c3%a9?q=%41", "/a/caf%C3%A9", "q=%41"),
    ] {
        let answer = get(&gw.url(asked)).await;
        assert_eq!(answer.status, StatusCode::OK, "{asked}");
        let echoed = answer.json();
        assert_eq!(echoed["path"], path, "{asked}");
        assert_eq!(echoed["query"].as_str().unwrap_or(""), query, "{asked}");
    }
}

#[tokio::test]
async fn chunks_reach_the_client_before_the_upstream_sends_the_next() {
    // The upstream sends one SSE event, then waits until the test has seen it before sending the second:
    // a gateway that buffered would never deliver the first, and the test would time out.
    let (release_tx, release_rx) = mpsc::channel::<()>(1);
    let release_rx = std::sync::Arc::new(tokio::sync::Mutex::new(release_rx));
    let upstream = spawn_upstream(move |_req| {
        let release_rx = release_rx.clone();
        async move {
            let (mut tx, body) = Channel::<Bytes, Infallible>::new(4);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"data: first\n\n")).await;
                let _ = release_rx.lock().await.recv().await;
                let _ = tx.send_data(Bytes::from_static(b"data: second\n\n")).await;
            });
            let mut response = Response::new(body.map_err(|never| match never {}).boxed_unsync());
            response.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            response
        }
    })
    .await;
    let toml = toml_with(&[("llm", &upstream.url())], "[[routes]]\npath = \"/stream\"\nupstream = \"llm\"\n");
    let gw = start_gateway(&toml).await;
    let response = client().request(Request::get(gw.url("/stream")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event before the second is sent");
    assert_eq!(first.unwrap().unwrap().into_data().unwrap(), Bytes::from_static(b"data: first\n\n"));
    release_tx.send(()).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.unwrap();
    assert_eq!(second.unwrap().unwrap().into_data().unwrap(), Bytes::from_static(b"data: second\n\n"));
}

/// An upstream on raw sockets answering every request `ok` (by length, or chunked), counting the connections
/// it accepted and the ones it closed. With `closing`, each connection closes after its first answer, when
/// the test adds a permit, without announcing it: as a server whose keep-alive timeout is over does.
async fn counting_upstream(
    chunked: bool,
    closing: Option<Arc<tokio::sync::Semaphore>>,
) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (accepted_count, closed_count) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            accepted_count.fetch_add(1, Ordering::SeqCst);
            let (closed_count, closing) = (closed_count.clone(), closing.clone());
            tokio::spawn(async move {
                let mut received = Vec::new();
                let mut buffer = [0u8; 4096];
                while let Ok(n @ 1..) = socket.read(&mut buffer).await {
                    received.extend_from_slice(&buffer[..n]);
                    // Requests without a body: each ends with its blank line.
                    while let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                        received.drain(..end + 4);
                        let answer: &[u8] = match chunked {
                            true => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                            false => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                        };
                        socket.write_all(answer).await.unwrap();
                        if let Some(closing) = &closing {
                            closing.acquire().await.unwrap().forget();
                            drop(socket);
                            closed_count.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                }
                closed_count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (url, accepted, closed)
}

#[tokio::test]
async fn upstream_connections_are_reused_once_their_answer_is_read() {
    let (by_length, by_length_connections, _) = counting_upstream(false, None).await;
    let (chunked, chunked_connections, _) = counting_upstream(true, None).await;
    let routes = "[[routes]]\npath = \"/length\"\nupstream = \"length\"\n\
                  [[routes]]\npath = \"/chunked\"\nupstream = \"chunked\"\n";
    // One worker thread: every request goes through the same thread's pool.
    let toml = toml_with(&[("length", &by_length), ("chunked", &chunked)], routes)
        .replace("[server]\n", "[server]\nworkers = 1\n");
    let gw = start_gateway(&toml).await;
    for _ in 0..10 {
        for path in ["/length", "/chunked"] {
            let answer = get(&gw.url(path)).await;
            assert_eq!((answer.status, answer.text().as_str()), (StatusCode::OK, "ok"), "{path}");
        }
    }
    assert_eq!(by_length_connections.load(Ordering::SeqCst), 1, "a body read to its length frees its connection");
    assert_eq!(chunked_connections.load(Ordering::SeqCst), 1, "a chunked body frees its connection at its end");
}

#[tokio::test]
async fn an_upstream_closing_idle_connections_costs_no_request() {
    let closing = Arc::new(tokio::sync::Semaphore::new(0));
    let (url, accepted, closed) = counting_upstream(false, Some(closing.clone())).await;
    let toml = toml_with(&[("api", &url)], "[[routes]]\npath = \"/x\"\nupstream = \"api\"\n")
        .replace("[server]\n", "[server]\nworkers = 1\n");
    let gw = start_gateway(&toml).await;
    for round in 1..=5 {
        let answer = get(&gw.url("/x")).await;
        assert_eq!((answer.status, answer.text().as_str()), (StatusCode::OK, "ok"), "request {round}");
        // The connection the gateway keeps for the next request closes now, while idle.
        closing.add_permits(1);
        while closed.load(Ordering::SeqCst) < round {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_connection_still_sending_a_body_is_not_handed_to_the_next_request() {
    // The upstream answers as soon as it has a request's head, as an API refusing an upload does, while the
    // client's body is still coming: that connection is busy until the body ends.
    let (url, accepted, _) = counting_upstream(false, None).await;
    let toml = toml_with(&[("api", &url)], "[[routes]]\npath = \"/x\"\nupstream = \"api\"\n")
        .replace("[server]\n", "[server]\nworkers = 1\n");
    let gw = start_gateway(&toml).await;
    let (mut upload, body) = Channel::<Bytes, Infallible>::new(1);
    upload.send_data(Bytes::from_static(b"first part")).await.unwrap();
    let post = Request::post(gw.url("/x")).body(body).unwrap();
    let poster = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let answer = poster.request(post).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.into_body().collect().await.unwrap().to_bytes(), "ok");

    let next = tokio::time::timeout(Duration::from_secs(10), get(&gw.url("/x")))
        .await
        .expect("the next request must not wait for another client's upload");
    assert_eq!((next.status, next.text().as_str()), (StatusCode::OK, "ok"));
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the busy connection was not reused");
    drop(upload);
}

/// Writes `request` as is on a new connection and reads the answer to its end (it must ask to close): hyper's
/// client would not send every byte a hostile client can.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

fn h2_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(hyper_util::client::legacy::connect::HttpConnector::new())
}

#[tokio::test]
async fn a_backslash_in_the_path_is_refused_before_any_route() {
    let echo = spawn_echo("echo").await;
    let toml = paid_config(&echo.url(), "", "facilitator = \"http://127.0.0.1:9\"")
        + "[[routes]]\npath = \"/public/*\"\nupstream = \"api\"\n\
           [[routes]]\npath = \"/premium/*\"\nupstream = \"api\"\namount = \"1000\"\n\
           [[routes]]\npath = \"/*\"\nupstream = \"api\"\n";
    let gw = start_gateway(&toml).await;
    let addr = gw.http.unwrap();
    for path in ["/public/..\\premium\\report", "/public/%2e%2e\\premium\\report", "/premium\\report"] {
        let head = format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(addr, head.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("\"invalid_path\""), "{path}: {answer}");
        let over_h2 = send(&h2_client(), Request::get(gw.url(path)).body(Full::default()).unwrap()).await;
        assert_eq!(over_h2.status, StatusCode::BAD_REQUEST, "h2 {path}");
        assert_eq!(over_h2.json()["error"], "invalid_path", "h2 {path}");
    }
    assert_eq!(echo.hits(), 0, "the upstream saw none of them");
    let fine = get(&gw.url("/public/report")).await;
    assert_eq!((fine.status, fine.json()["path"].as_str()), (StatusCode::OK, Some("/public/report")));
}

#[tokio::test]
async fn a_non_ascii_path_is_one_route_and_reaches_the_upstream_encoded_once() {
    let (cafe, other) = (spawn_echo("cafe").await, spawn_echo("other").await);
    let toml = toml_with(
        &[("cafe", &cafe.url()), ("other", &other.url())],
        "[[routes]]\npath = \"/free/café\"\nupstream = \"cafe\"\n[[routes]]\npath = \"/*\"\nupstream = \"other\"\n",
    );
    let gw = start_gateway(&toml).await;
    let head = "GET /free/café HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(gw.http.unwrap(), head.as_bytes()).await;
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_else(|| panic!("no body: {answer}"));
    let echoed: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {answer}"));
    assert_eq!((&echoed["upstream"], &echoed["path"]), (&"cafe".into(), &"/free/caf%C3%A9".into()), "raw bytes");
    for path in ["/free/café", "/free/caf%C3%A9", "/free/caf%c3%a9", "/free/%63af%C3%A9"] {
        for (version, client) in [("h1", client()), ("h2", h2_client())] {
            let answer = send(&client, Request::get(gw.url(path)).body(Full::default()).unwrap()).await;
            assert_eq!(answer.status, StatusCode::OK, "{version} {path}");
            let echoed = answer.json();
            assert_eq!(echoed["upstream"], "cafe", "{version} {path}");
            assert_eq!(echoed["path"], "/free/caf%C3%A9", "{version} {path}");
        }
    }
    let other_path = get(&gw.url("/b%C3%A4r/\"q\"/ü")).await;
    assert_eq!(other_path.json()["path"], "/b%C3%A4r/%22q%22/%C3%BC");
}

#[tokio::test]
async fn a_request_that_names_no_host_is_refused() {
    let echo = spawn_echo("echo").await;
    let toml = toml_with(&[("echo", &echo.url())], "[[routes]]\npath = \"/*\"\nupstream = \"echo\"\n");
    let gw = start_gateway(&toml).await;
    let addr = gw.http.unwrap();
    for head in [
        "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.0\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw_exchange(addr, head.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.") && answer[9..].starts_with("400"), "{head:?}: {answer}");
        assert!(answer.contains("\"missing_host\""), "{head:?}: {answer}");
    }
    // h2 without `:authority` and without `Host`.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get("/x").body(Full::<Bytes>::default()).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await.unwrap().unwrap();
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"missing_host\""), "{body:?}");
    assert_eq!(echo.hits(), 0);

    let named = raw_exchange(addr, b"GET /x HTTP/1.0\r\nHost: shop.example\r\n\r\n").await;
    assert!(named.starts_with("HTTP/1.0 200") || named.starts_with("HTTP/1.1 200"), "{named}");
}

#[tokio::test]
async fn discovery_built_from_the_host_header_is_not_cached() {
    let echo = spawn_echo("echo").await;
    let routes = "[[routes]]\npath = \"/paid\"\nupstream = \"api\"\namount = \"1000\"\n";
    let payment = "facilitator = \"http://127.0.0.1:9\"";
    let from_host = start_gateway(&(paid_config(&echo.url(), "", payment) + routes)).await;
    let answer = get(&from_host.url("/.well-known/x402")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["cache-control"], "no-store");
    assert_eq!(answer.headers["vary"], "Host");

    let fixed =
        start_gateway(&(paid_config(&echo.url(), "public_url = \"https://api.example.com\"", payment) + routes)).await;
    let answer = get(&fixed.url("/.well-known/x402")).await;
    assert_eq!(answer.json()["items"][0]["resource"], "https://api.example.com/paid");
    assert!(answer.headers.get("cache-control").is_none(), "the same document for every Host may be cached");
    let challenge = get(&from_host.url("/paid")).await;
    assert_eq!(
        (challenge.status, &challenge.headers["cache-control"]),
        (StatusCode::PAYMENT_REQUIRED, &"no-store".parse::<http::HeaderValue>().unwrap())
    );
}

#[tokio::test]
async fn injected_credentials_never_come_back_in_answer_urls_and_upstream_redirects_stay_usable() {
    let (key, token) = ("op-key 7f3&b0e1", "hdr-token-51c2e9");
    // Answers `/x` as `python -m http.server` answers a folder without its slash (the URL it was asked, query
    // and all, in `Location`), and under `/base/` with absolute URLs at its own origin.
    let upstream = spawn_upstream(|req: http::Request<hyper::body::Incoming>| async move {
        let (path, query) = (req.uri().path().to_string(), req.uri().query().unwrap_or("").to_string());
        let host = req.headers()["host"].to_str().unwrap().to_string();
        let token = req.headers()["authorization"].to_str().unwrap().trim_start_matches("Bearer ").to_string();
        let mut response = Response::new(x402_gateway::proxy::body::full(format!("{path}?{query}")));
        if path.ends_with('/') || path.ends_with("/landing") {
            return response;
        }
        *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
        let headers = response.headers_mut();
        if let Some(rest) = path.strip_prefix("/base/") {
            headers.insert("location", format!("http://{host}/base/{rest}/landing?x=1&{query}").parse().unwrap());
            headers.insert("content-location", format!("http://{host}/base/keys/{token}").parse().unwrap());
        } else {
            headers.insert("location", format!("{path}/?{query}").parse().unwrap());
            headers.insert("content-location", format!("{path}?{query}").parse().unwrap());
            headers.insert("link", format!("<{path}?{query}&page=2>; rel=\"next\"").parse().unwrap());
            headers.insert("refresh", format!("0; url={path}?token={token}").parse().unwrap());
        }
        response
    })
    .await;
    let credentials = "headers = { Authorization = \"Bearer ${T_TOKEN}\" }\nquery = { api_key = \"${T_KEY}\" }\n";
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.files]\nurl = \"{0}\"\n{credentials}\
         [upstreams.app]\nurl = \"{0}/base\"\n{credentials}\
         [[routes]]\npath = \"/docs/*\"\nupstream = \"files\"\n\
         [[routes]]\npath = \"/public/*\"\nupstream = \"app\"\nstrip_prefix = \"/public\"\n",
        upstream.url()
    );
    let gw = start_gateway_with_env(&toml, &[("T_KEY", key), ("T_TOKEN", token)]).await;
    let shows_a_secret = |answer: &Answer| {
        answer.headers.iter().any(|(_, value)| {
            let text = String::from_utf8_lossy(value.as_bytes()).to_string();
            let decoded: String =
                form_urlencoded::parse(text.as_bytes()).map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
            [text, decoded].iter().any(|t| t.contains("op-key") || t.contains("7f3") || t.contains(token))
        })
    };

    let redirect = get(&gw.url("/docs/sub")).await;
    assert_eq!(redirect.status, StatusCode::MOVED_PERMANENTLY);
    assert!(!shows_a_secret(&redirect), "{:?}", redirect.headers);
    assert_eq!(redirect.headers["location"], "/docs/sub/");
    assert_eq!(redirect.headers["content-location"], "/docs/sub");
    assert_eq!(redirect.headers["link"], "</docs/sub?page=2>; rel=\"next\"");
    assert_eq!(redirect.headers["refresh"], "0; url=/docs/sub");
    let followed = get(&gw.url(redirect.headers["location"].to_str().unwrap())).await;
    assert_eq!(followed.status, StatusCode::OK, "the cleaned Location still works");

    let absolute = get(&gw.url("/public/abs")).await;
    assert_eq!(absolute.status, StatusCode::MOVED_PERMANENTLY);
    assert!(!shows_a_secret(&absolute), "{:?}", absolute.headers);
    assert_eq!(absolute.headers["location"], "/public/abs/landing?x=1", "the gateway's path for it");
    assert!(absolute.headers.get("content-location").is_none(), "a value in the path: no way to clean it");
    let landed = get(&gw.url(absolute.headers["location"].to_str().unwrap())).await;
    assert_eq!(landed.status, StatusCode::OK);
    assert!(landed.text().starts_with("/base/abs/landing?x=1&api_key="), "{}", landed.text());
}
