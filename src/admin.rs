//! The admin listener's answers. It never shares a port with paid traffic.

use crate::proxy::body::{json_response, Body};
use http::{Method, Request, Response, StatusCode};

pub fn respond<B>(request: &Request<B>) -> Response<Body> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => json_response(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
        _ => json_response(StatusCode::NOT_FOUND, &serde_json::json!({ "error": "no_route" })),
    }
}
