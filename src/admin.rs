//! The admin listener's answers: liveness, readiness and metrics. It never shares a port with paid traffic.

use crate::body::{full, json_response, Body};
use crate::settlement::Readiness;
use http::{header, HeaderValue, Response, StatusCode};

pub fn healthz() -> Response<Body> {
    json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// 200 when ready, else 503; either way each check and each remote facilitator's state (by redacted URL).
pub fn readyz(readiness: Readiness) -> Response<Body> {
    let Readiness { ready, checks, facilitators } = readiness;
    let checks: Vec<serde_json::Value> = checks
        .into_iter()
        .map(|(name, result)| match result {
            Ok(()) => serde_json::json!({ "name": name, "ok": true }),
            Err(error) => serde_json::json!({ "name": name, "ok": false, "error": error }),
        })
        .collect();
    let facilitators: Vec<serde_json::Value> = facilitators
        .into_iter()
        .map(|f| {
            serde_json::json!({
                "name": f.name,
                "healthy": f.healthy,
                "verify_limit": f.verify_limit,
                "settle_limit": f.settle_limit,
                "verify_in_flight": f.verify_in_flight,
                "settle_in_flight": f.settle_in_flight,
                "retries": f.retries,
                "failovers": f.failovers,
            })
        })
        .collect();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unready" },
        "config": "loaded",
        "checks": checks,
        "facilitators": facilitators,
    });
    json_response(status, &body)
}

pub fn metrics(text: String) -> Response<Body> {
    let mut response = Response::new(full(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

pub fn not_found() -> Response<Body> {
    json_response(StatusCode::NOT_FOUND, &serde_json::json!({ "error": "no_route" }))
}
