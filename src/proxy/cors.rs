//! CORS preflights for paid routes are answered by the gateway: a preflight is never charged, and the
//! browser must be allowed to send the payment headers and read the answers' payment headers.

use super::body::{full, Body};
use crate::x402::challenge::EXPOSE_HEADERS;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

const ALLOWED_HEADERS: &str = "Content-Type, Authorization, PAYMENT-SIGNATURE, X-PAYMENT";

/// The method a CORS preflight asks about, if `request` is one.
pub fn preflight_method<B>(request: &Request<B>) -> Option<Method> {
    if request.method() != Method::OPTIONS {
        return None;
    }
    let requested = request.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(requested.as_bytes()).ok()
}

pub fn preflight_response(request_headers: &HeaderMap, method: &Method) -> Response<Body> {
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    if let Ok(method) = HeaderValue::from_str(method.as_str()) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, method);
    }
    let allowed = request_headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or(HeaderValue::from_static(ALLOWED_HEADERS));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed);
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSE_HEADERS));
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    response
}
