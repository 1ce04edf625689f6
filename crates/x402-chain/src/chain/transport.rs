//! alloy's JSON-RPC transport over the gateway's own HTTP client, so chain access shares its TLS stack
//! (rustls with ring) instead of pulling in a second one.

use crate::client::{https_client, HttpsClient};
use alloy::rpc::json_rpc::{RequestPacket, ResponsePacket};
use alloy::transports::{TransportError, TransportErrorKind, TransportFut};
use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Full};
use std::task::{Context, Poll};
use std::time::Duration;

/// Largest JSON-RPC answer read from a node.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct HttpTransport {
    client: HttpsClient<Full<Bytes>>,
    /// May carry a provider's API key in its path: never logged or shown.
    url: Uri,
    timeout: Duration,
}

impl HttpTransport {
    pub fn new(url: Uri, timeout: Duration) -> HttpTransport {
        HttpTransport { client: https_client(), url, timeout }
    }

    async fn round_trip(self, packet: RequestPacket) -> Result<ResponsePacket, TransportError> {
        let body = serde_json::to_vec(&packet).map_err(TransportError::ser_err)?;
        let request = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(TransportErrorKind::custom)?;
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| TransportErrorKind::custom_str("RPC request timed out"))?
            .map_err(TransportErrorKind::custom)?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| TransportErrorKind::custom_str(&format!("reading the RPC answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(TransportErrorKind::http_error(status.as_u16(), String::from_utf8_lossy(&body).into_owned()));
        }
        serde_json::from_slice(&body).map_err(|e| TransportError::deser_err(e, String::from_utf8_lossy(&body)))
    }
}

impl tower_service::Service<RequestPacket> for HttpTransport {
    type Response = ResponsePacket;
    type Error = TransportError;
    type Future = TransportFut<'static>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, packet: RequestPacket) -> Self::Future {
        Box::pin(self.clone().round_trip(packet))
    }
}
