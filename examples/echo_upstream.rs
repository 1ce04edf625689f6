//! A stand-in upstream API for trying the gateway: answers every request on 127.0.0.1:9000 with a JSON
//! echo of what it received (so you can see the operator's injected credentials arrive, and payment
//! headers not arrive). Run: `cargo run --example echo_upstream`, or with another address to listen on
//! (`cargo run --example echo_upstream -- 127.0.0.1:0` lets the kernel pick a port; the first line printed
//! says which).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("echo upstream on http://{}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(|request: Request<Incoming>| async move {
                let (parts, body) = request.into_parts();
                let length = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                let headers: serde_json::Map<String, serde_json::Value> = parts
                    .headers
                    .iter()
                    .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into()))
                    .collect();
                let echo = serde_json::json!({
                    "method": parts.method.as_str(),
                    "path": parts.uri.path(),
                    "query": parts.uri.query(),
                    "headers": headers,
                    "body_bytes": length,
                });
                let mut response = Response::new(Full::new(Bytes::from(echo.to_string())));
                response
                    .headers_mut()
                    .insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
                Ok::<_, Infallible>(response)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
