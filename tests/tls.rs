//! The HTTPS listener (HTTP/1.1 and HTTP/2 chosen by ALPN) and HTTP/2 with prior knowledge on the plain
//! listener, through real sockets on loopback.

mod common;

use bytes::Bytes;
use common::config::{GatewayToml, Route};
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::time::Duration;

type TlsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A gateway with a plain and an HTTPS listener (the committed dev certificate), everything routed to `echo`.
async fn start_tls_gateway(echo: &Upstream) -> Gateway {
    let toml = GatewayToml::new().listen().tls().upstream("echo", &echo.url()).route(Route::free("/*", "echo"));
    start_gateway(&toml.build()).await
}

/// A client trusting only the development CA; it offers only HTTP/1.1 or only h2 by ALPN.
fn tls_client(http2: bool) -> TlsClient {
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(dev_ca_client_config()).https_only();
    if http2 {
        Client::builder(TokioExecutor::new()).http2_only(true).build(builder.enable_http2().build())
    } else {
        Client::builder(TokioExecutor::new()).build(builder.enable_http1().build())
    }
}

/// Sends a GET and returns the response's version with its body parsed as JSON.
async fn get_json<C>(client: &Client<C, Full<Bytes>>, url: &str) -> (StatusCode, Version, serde_json::Value)
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let request = Request::get(url).body(Full::default()).expect("valid request");
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .unwrap_or_else(|_| panic!("no answer from {url} within 10 s"))
        .unwrap_or_else(|e| panic!("request to {url} failed: {e:?}"));
    let (status, version) = (response.status(), response.version());
    let body = response.into_body().collect().await.expect("response body").to_bytes();
    let json =
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, version, json)
}

#[tokio::test]
async fn https_with_http1_reaches_the_upstream() {
    let echo = spawn_echo("echo").await;
    let gw = start_tls_gateway(&echo).await;
    let https = gw.https.expect("HTTPS listener bound");
    let url = format!("https://{https}/secure/one?x=1");
    let (status, version, json) = get_json(&tls_client(false), &url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, Version::HTTP_11, "ALPN offered only http/1.1");
    assert_eq!(json["upstream"], "echo");
    assert_eq!(json["path"], "/secure/one");
    assert_eq!(json["query"], "x=1");
    assert_eq!(json["headers"]["x-forwarded-proto"], "https");
    assert_eq!(echo.hits(), 1);
}

#[tokio::test]
async fn https_with_h2_by_alpn_reaches_the_upstream() {
    let echo = spawn_echo("echo").await;
    let gw = start_tls_gateway(&echo).await;
    let https = gw.https.expect("HTTPS listener bound");
    let client = tls_client(true);
    // Two requests on one client: the second rides the same h2 connection.
    for path in ["/secure/h2", "/secure/h2-again"] {
        let (status, version, json) = get_json(&client, &format!("https://{https}{path}")).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(version, Version::HTTP_2, "ALPN offered only h2 ({path})");
        assert_eq!(json["upstream"], "echo");
        assert_eq!(json["path"], path);
        assert_eq!(json["headers"]["x-forwarded-proto"], "https");
        assert_eq!(
            json["headers"]["x-forwarded-host"],
            https.to_string(),
            "an h2 request's :authority is the original host"
        );
    }
    assert_eq!(echo.hits(), 2);
}

#[tokio::test]
async fn h2c_with_prior_knowledge_on_the_plain_listener() {
    let echo = spawn_echo("echo").await;
    let gw = start_tls_gateway(&echo).await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new());
    let (status, version, json) = get_json(&client, &gw.url("/plain/h2c")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(json["path"], "/plain/h2c");
    assert_eq!(json["headers"]["x-forwarded-proto"], "http");
    assert_eq!(echo.hits(), 1);
}

/// An https upstream on loopback serving the committed dev certificate (signed by `certs/dev-ca.crt`), h2 or
/// http/1.1 by ALPN; it answers every request with the path it got.
async fn spawn_tls_upstream() -> std::net::SocketAddr {
    use rustls_pki_types::PrivateKeyDer;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(repo_path("certs/server.crt")).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(repo_path("certs/server.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let answer = serde_json::json!({ "over": "tls", "path": request.uri().path() });
                    Ok::<_, std::convert::Infallible>(http::Response::new(x402_gateway::proxy::body::full(
                        answer.to_string(),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// Everything routed to the upstream `secure` at `{scheme}://localhost:{port}/base`, trusting `ca_file` if given.
fn secure_upstream_config(scheme: &str, addr: std::net::SocketAddr, ca_file: Option<&str>) -> String {
    let url = format!("{scheme}://localhost:{}/base", addr.port());
    let toml = GatewayToml::new().listen().upstream("secure", &url).route(Route::free("/*", "secure"));
    match ca_file {
        Some(path) => toml.upstream_setting("secure", "ca_file", path).build(),
        None => toml.build(),
    }
}

fn dev_ca() -> String {
    repo_path("certs/dev-ca.crt").display().to_string()
}

#[tokio::test]
async fn an_https_upstream_is_trusted_through_its_ca_file_and_refused_without_it() {
    let upstream = spawn_tls_upstream().await;
    let trusted = start_gateway(&secure_upstream_config("https", upstream, Some(&dev_ca()))).await;
    for path in ["/one", "/two"] {
        let answer = get(&trusted.url(path)).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.text());
        assert_eq!(answer.json(), serde_json::json!({ "over": "tls", "path": format!("/base{path}") }));
    }

    // The same upstream without its CA: the webpki roots do not know it, so the handshake fails.
    let untrusted = start_gateway(&secure_upstream_config("https", upstream, None)).await;
    let refused = get(&untrusted.url("/one")).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY, "{}", refused.text());
    assert_eq!(refused.json()["error"], "upstream_unavailable");
}

#[tokio::test]
async fn a_ca_file_is_checked_at_load_and_named() {
    let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let parse = |toml: &str| {
        x402_gateway::config::Config::parse(toml, "g.toml".as_ref(), ".".as_ref(), &|_| None)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let with = |path: &str| secure_upstream_config("https", addr, Some(path));
    let missing = parse(&with("/nonexistent/ca.pem"));
    assert!(missing.contains("upstreams.secure.ca_file") && missing.contains("cannot read"), "{missing}");
    // A PEM file with a key and no certificate.
    let key_only = parse(&with(&repo_path("certs/server.key").display().to_string()));
    assert!(key_only.contains("upstreams.secure.ca_file") && key_only.contains("no PEM certificate"), "{key_only}");
    // A certificate block that holds no certificate.
    let garbage = test_dir().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let garbage = parse(&with(&garbage.display().to_string()));
    assert!(garbage.contains("upstreams.secure.ca_file") && garbage.contains("not a usable CA"), "{garbage}");
    let plain = parse(&secure_upstream_config("http", addr, Some(&dev_ca())));
    assert!(plain.contains("upstreams.secure.ca_file") && plain.contains("https"), "{plain}");
}
