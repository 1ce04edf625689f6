//! Test harness: real upstream servers and a real gateway, all on 127.0.0.1 with ports picked by the kernel.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod binary;
pub mod chain;
pub mod config;
pub mod facilitator;
pub mod logs;
pub mod pay;
pub mod tools;
pub mod upto;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use x402_gateway::config::Config;
/// The ledger's methods, for the tests that read a running gateway's ledger.
pub use x402_gateway::ledger::PaymentStore;
use x402_gateway::proxy::body::{full, Body};

pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> std::pin::Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync>;

/// An upstream server written for a test; counts the requests that reach it.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

pub async fn spawn_upstream<F, Fut>(handler: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(handler);
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let handler = handler.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Upstream { addr, hits }
}

/// An upstream that answers every request with a JSON description of what it received.
pub async fn spawn_echo(name: &'static str) -> Upstream {
    spawn_upstream(move |req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let headers: serde_json::Map<String, serde_json::Value> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_str().unwrap_or("<binary>").to_string())))
            .collect();
        let echo = serde_json::json!({
            "upstream": name,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body_len": body.len(),
        });
        let mut response = Response::new(full(echo.to_string()));
        response.headers_mut().insert("content-type", "application/json".parse().unwrap());
        response
    })
    .await
}

/// A gateway running in this process.
pub struct Gateway {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<()>>,
    pub dir: PathBuf,
    /// The running gateway's request pipeline.
    pub pipeline: Arc<x402_gateway::pipeline::Gateway>,
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http.expect("plain listener"), path)
    }

    /// Signals shutdown and returns the task that finishes when the server has stopped.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.done.take().expect("running")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The payee of the tests' paid routes (anvil's account #3).
pub const PAY_TO: &str = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";

/// The start of a paid gateway's configuration as text: a plain listener on a free port, the upstream `api`,
/// and `[payment]` in USDC on eip155:84532 to `PAY_TO`. `server` and `payment` add lines to those sections;
/// routes and `[networks]` follow. `config::GatewayToml` writes the same; tests/proxy.rs and
/// tests/pay_command.rs still use this.
pub fn paid_config(upstream: &str, server: &str, payment: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[upstreams.api]\nurl = \"{upstream}\"\n\
         [payment]\npay_to = \"{PAY_TO}\"\nnetwork = \"eip155:84532\"\nasset = \"USDC\"\n{payment}\n"
    )
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A fresh folder for one test's files, under the target directory.
pub fn test_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "gw-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Writes `toml` to a fresh folder and starts a gateway on it. `env` answers `${VAR}` look-ups.
pub async fn start_gateway_with_env(toml: &str, env: &[(&str, &str)]) -> Gateway {
    let dir = test_dir();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let config = Config::parse(toml, &path, &dir, &lookup).expect("valid config");
    let server = x402_gateway::pipeline::bind(config).await.expect("bind");
    let (http, https, admin) = (server.http_addr(), server.https_addr(), server.admin_addr());
    let pipeline = server.handler().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Gateway { http, https, admin, stop: Some(stop), done: Some(done), dir, pipeline }
}

pub async fn start_gateway(toml: &str) -> Gateway {
    start_gateway_with_env(toml, &[]).await
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A response with its body read to the end.
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Answer {
    let response = client.request(request).await.expect("request");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer { status: parts.status, headers: parts.headers, body }
}

pub async fn get(url: &str) -> Answer {
    send(&client(), Request::get(url).body(Full::default()).unwrap()).await
}

/// A TLS client configuration that trusts only the development CA (`certs/dev-ca.crt`).
pub fn dev_ca_client_config() -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca_path = repo_path("certs/dev-ca.crt");
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(&ca_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", ca_path.display()));
    for cert in certs {
        roots.add(cert.expect("PEM certificate in dev-ca.crt")).expect("dev CA accepted as a trust anchor");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}
