//! `GET /.well-known/x402`: every paid resource with its offers (v2 shape), so buyers' agents and catalogues
//! can find what is sold here without paying first.

use crate::config::RouteSpec;
use crate::proxy::body::{json_response, Body};
use crate::x402::challenge::requirements_v2;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

pub const PATH: &str = "/.well-known/x402";

/// The document as answered. With `urls_from_host` (no `server.public_url`) its URLs come from the client's
/// `Host`, so no cache may give one client's copy to another.
pub fn response(document: &Value, urls_from_host: bool) -> Response<Body> {
    let mut response = json_response(StatusCode::OK, document);
    if urls_from_host {
        let headers = response.headers_mut();
        headers.insert(header::VARY, HeaderValue::from_static("Host"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The discovery document for `routes`, with resource URLs under `base_url` (no trailing slash).
pub fn document(routes: &[Arc<RouteSpec>], base_url: &str) -> Value {
    let items: Vec<Value> = routes
        .iter()
        .filter_map(|route| {
            let paid = route.payment.as_ref()?;
            let accepts: Vec<Value> = paid
                .pricing
                .all_offers()
                .into_iter()
                .flat_map(|(_, offers)| offers.iter().map(requirements_v2))
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect();
            let mut item = json!({
                "resource": format!("{base_url}{}", route.pattern_text),
                "type": "http",
                "x402Version": 2,
                "description": paid.description,
                "mimeType": paid.mime_type,
                "methods": route.methods.as_ref().map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>()),
                "accepts": accepts,
            });
            if let Some(bazaar) = &paid.bazaar {
                item["extensions"] = json!({ "bazaar": bazaar.extension });
            }
            Some(item)
        })
        .collect();
    let total = items.len();
    json!({ "x402Version": 2, "items": items, "pagination": { "limit": total, "offset": 0, "total": total } })
}
