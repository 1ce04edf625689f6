//! The outbound HTTP client (upstreams, chain RPC, remote facilitators): pooled keep-alive connections,
//! http or https (rustls with the webpki roots, plus an upstream's own CA if it names one; h2 by ALPN).

use hyper_rustls::builderstates::WantsSchemes;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::time::Duration;

pub type HttpsClient<B> = Client<HttpsConnector<HttpConnector>, B>;

pub fn https_client<B>() -> HttpsClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    client_over(HttpsConnectorBuilder::new().with_webpki_roots())
}

/// An https client that trusts `extra_roots` (an upstream's `ca_file`) besides the webpki roots. `Err` when
/// one of them cannot be a trust anchor.
pub fn https_client_trusting<B>(extra_roots: Vec<CertificateDer<'static>>) -> Result<HttpsClient<B>, rustls::Error>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(client_over(HttpsConnectorBuilder::new().with_tls_config(config)))
}

fn client_over<B>(tls: HttpsConnectorBuilder<WantsSchemes>) -> HttpsClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = tcp_connector();
    http.enforce_http(false);
    let https = tls.https_or_http().enable_http1().enable_http2().wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https)
}

/// Opens the TCP connections of every outbound client: no Nagle delay, a connect timeout, and IPv4 tried
/// soon when IPv6 stalls.
pub fn tcp_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http
}
