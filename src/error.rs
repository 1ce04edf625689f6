//! Every way a request can fail, and in one table what the client sees for it: HTTP status and reason string.

use crate::body::{json_response, Body};
use crate::paths::PathError;
use http::{header, HeaderValue, Method, Response, StatusCode};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid request path: {0}")]
    BadPath(#[from] PathError),
    #[error("the request names no host: send a `Host` header (`:authority` over HTTP/2)")]
    MissingHost,
    #[error("no route for this path")]
    NoRoute,
    #[error("method not allowed on this path")]
    MethodNotAllowed(Vec<Method>),
    #[error("request body larger than the configured limit")]
    BodyTooLarge,
    #[error("the request body could not be read")]
    BodyUnreadable,
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("too many request bodies are being read right now; retry shortly")]
    BufferedBodiesFull,
    #[error("{0}")]
    Price(#[from] crate::pricing::PriceError),
    #[error("malformed payment header: {0}")]
    MalformedPayment(String),
    #[error("too many payments in flight; retry shortly")]
    PaymentsBusy,
    #[error("too many payment attempts from this address; retry in {retry_after} s")]
    TooManyPaymentAttempts { retry_after: u64 },
    #[error("payments cannot be checked right now: {0}")]
    FacilitatorUnavailable(String),
    #[error("the upstream answer is larger than a paid answer held for settlement may be")]
    AnswerTooLarge,
    #[error("the payment ledger cannot be written; no payment is taken")]
    LedgerUnavailable,
    #[error("internal error")]
    Internal,
    #[error("the upstream service could not be reached")]
    UpstreamUnavailable,
    #[error("the upstream service did not answer in time")]
    UpstreamTimeout,
}

impl GatewayError {
    /// The one table: status code and machine-readable reason for each error.
    pub fn status_and_reason(&self) -> (StatusCode, &'static str) {
        use GatewayError::*;
        match self {
            BadPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            MissingHost => (StatusCode::BAD_REQUEST, "missing_host"),
            NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            BodyUnreadable => (StatusCode::BAD_REQUEST, "invalid_body"),
            BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            BufferedBodiesFull => (StatusCode::SERVICE_UNAVAILABLE, "server_busy"),
            Price(crate::pricing::PriceError::NotJson(_)) => (StatusCode::BAD_REQUEST, "invalid_body"),
            Price(crate::pricing::PriceError::Ambiguous(_)) => (StatusCode::BAD_REQUEST, "ambiguous_price_key"),
            Price(crate::pricing::PriceError::Unknown { .. }) => (StatusCode::BAD_REQUEST, "unknown_price_key"),
            Price(crate::pricing::PriceError::TokenLimit(_)) => (StatusCode::BAD_REQUEST, "invalid_token_limit"),
            Price(crate::pricing::PriceError::NoUptoSigner) => {
                (StatusCode::SERVICE_UNAVAILABLE, "facilitator_unavailable")
            }
            MalformedPayment(_) => (StatusCode::BAD_REQUEST, "invalid_payload"),
            PaymentsBusy => (StatusCode::SERVICE_UNAVAILABLE, "payments_busy"),
            TooManyPaymentAttempts { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_payment_attempts"),
            FacilitatorUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "facilitator_unavailable"),
            AnswerTooLarge => (StatusCode::BAD_GATEWAY, "upstream_answer_too_large"),
            LedgerUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "ledger_unavailable"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            UpstreamUnavailable => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
            UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let (status, reason) = self.status_and_reason();
        let body = serde_json::json!({ "error": reason, "message": self.to_string() });
        let mut response = json_response(status, &body);
        match &self {
            GatewayError::MethodNotAllowed(methods) => {
                let allow = methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
                if let Ok(value) = HeaderValue::from_str(&allow) {
                    response.headers_mut().insert(header::ALLOW, value);
                }
            }
            GatewayError::BufferedBodiesFull => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::TooManyPaymentAttempts { retry_after } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        response
    }
}
