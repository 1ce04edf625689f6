//! `GET /.well-known/x402`: every paid resource with its offers (v2 shape), so buyers' agents and catalogues
//! can find what is sold here without paying first.
//!
//! A route with named segments or a prefix is no single URL: it is listed in the bazaar's route template form,
//! as the reference's discovery extension catalogues dynamic routes. The resource is the origin followed by the
//! template (`/users/:id`; a prefix's `*` becomes `:var1`), and the `bazaar` extension carries the same
//! `routeTemplate` and a schema of its `pathParams`.
//!
//! A per-token route (`upto`) lists its offers once, at the route's cap, and its rates in the item's
//! `metadata` (the discovery item's free-form field in the reference's bazaar): `metadata.perToken`.

use crate::body::{json_response, Body};
use crate::options::{PaidRoute, RouteSpec};
use crate::pricing::{Metering, Offer, Pricing};
use crate::x402::challenge::requirements_v2;
use alloy::primitives::Address;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use x402_proto::OfferScheme;

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

/// A dynamic route's path in the bazaar's form: `/users/:id`, `/paid/:var1` for `/paid/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTemplate {
    pub template: String,
    /// The names of its `:param` segments, in order.
    pub params: Vec<String>,
}

impl RouteTemplate {
    /// The template of a route pattern as written; `None` for an exact path, and for a bare `/*`, which
    /// names no resource of its own (the reference does not template wildcard-only routes either).
    pub fn of(pattern: &str) -> Option<RouteTemplate> {
        let mut params = Vec::new();
        let mut wildcards = 0;
        let segments: Vec<String> = pattern
            .split('/')
            .filter(|segment| !segment.is_empty())
            .map(|segment| {
                let name = match segment {
                    "*" => {
                        wildcards += 1;
                        format!("var{wildcards}")
                    }
                    _ => match segment.strip_prefix(':') {
                        Some(name) => name.to_string(),
                        None => return segment.to_string(),
                    },
                };
                let template = format!(":{name}");
                params.push(name);
                template
            })
            .collect();
        let wildcard_only = segments.len() == wildcards;
        if params.is_empty() || wildcard_only {
            return None;
        }
        Some(RouteTemplate { template: format!("/{}", segments.join("/")), params })
    }

    /// Adds the template to a `bazaar` extension (`{info, schema}`): `routeTemplate` beside them, and the
    /// schema of `info.input.pathParams`.
    pub fn annotate(&self, extension: &mut Value) {
        extension["routeTemplate"] = self.template.clone().into();
        let properties: serde_json::Map<String, Value> =
            self.params.iter().map(|name| (name.clone(), json!({ "type": "string" }))).collect();
        extension["schema"]["properties"]["input"]["properties"]["pathParams"] =
            json!({ "type": "object", "properties": properties, "required": self.params });
    }
}

/// The discovery document for `routes`, with resource URLs under `base_url` (no trailing slash).
/// `upto_signer` gives the address a paid route's `upto` offers on a chain name, where it is known.
pub fn document(
    routes: &[Arc<RouteSpec>],
    base_url: &str,
    upto_signer: impl Fn(&PaidRoute, u64) -> Option<Address>,
) -> Value {
    let items: Vec<Value> = routes
        .iter()
        .filter_map(|route| {
            let paid = route.payment.as_ref()?;
            let accepts: Vec<Value> = match &paid.pricing {
                // Each model of a per-token route is sold by the same offers: listed once, at their cap.
                Pricing::PerToken(metering) => metering
                    .offers
                    .iter()
                    .map(|offer| upto_requirements(offer, upto_signer(paid, offer.network.chain_id)))
                    .collect(),
                pricing => pricing
                    .all_offers()
                    .into_iter()
                    .flat_map(|(_, offers)| offers.iter().map(requirements_v2))
                    .filter_map(|r| serde_json::to_value(r).ok())
                    .collect(),
            };
            let methods = route.methods.as_ref().map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>());
            let template = RouteTemplate::of(&route.pattern_text);
            let path = match &template {
                Some(template) => template.template.as_str(),
                // A bare `/*`: the origin itself.
                None if route.pattern_text.ends_with('*') => "/",
                None => &*route.pattern_text,
            };
            let mut item = json!({
                "resource": format!("{base_url}{path}"),
                "type": "http",
                "x402Version": 2,
                "description": paid.description,
                "mimeType": paid.mime_type,
                "methods": methods,
                "accepts": accepts,
            });
            // A declared extension already carries the template (added at load); an undeclared one gets the
            // least that names the route.
            match (&paid.bazaar, &template) {
                (Some(bazaar), _) => item["extensions"] = json!({ "bazaar": bazaar.extension }),
                (None, Some(template)) => {
                    let method = methods.as_ref().and_then(|m| m.first().copied()).unwrap_or("GET");
                    let mut extension = json!({
                        "info": { "input": { "type": "http", "method": method } },
                        "schema": {
                            "$schema": "https://json-schema.org/draft/2020-12/schema",
                            "type": "object",
                            "properties": { "input": { "type": "object" } },
                            "required": ["input"],
                        },
                    });
                    template.annotate(&mut extension);
                    item["extensions"] = json!({ "bazaar": extension });
                }
                (None, None) => {}
            }
            if let Pricing::PerToken(metering) = &paid.pricing {
                item["metadata"] = json!({ "perToken": per_token(metering) });
            }
            Some(item)
        })
        .collect();
    let total = items.len();
    json!({ "x402Version": 2, "items": items, "pagination": { "limit": total, "offset": 0, "total": total } })
}

/// An `upto` offer at the route's cap, naming `signer`. A remote facilitator's address is learned from its
/// `/supported` when requests come (each 402 names it); until then discovery names none rather than a wrong one.
fn upto_requirements(offer: &Offer, signer: Option<Address>) -> Value {
    let offer = match signer {
        Some(facilitator) => offer.upto(offer.amount, facilitator),
        None => offer.clone(),
    };
    let mut requirements = serde_json::to_value(requirements_v2(&offer)).unwrap_or_default();
    if offer.scheme == (OfferScheme::Upto { facilitator: Address::ZERO }) {
        if let Some(extra) = requirements["extra"].as_object_mut() {
            extra.remove("facilitatorAddress");
        }
    }
    requirements
}

/// A per-token route's prices (the item's `metadata.perToken`): what selects the model, the cap, and each
/// model's rates as configured and in atomic units per million tokens of each offer's asset.
fn per_token(metering: &Metering) -> Value {
    let models: Vec<Value> = metering
        .listed()
        .iter()
        .map(|listed| {
            json!({
                "model": listed.model,
                "input": listed.input,
                "output": listed.output,
                "rates": crate::catalogue::per_token_rates(metering, listed),
            })
        })
        .collect();
    json!({
        "scheme": "upto",
        "by": metering.source.describe(),
        "max": metering.written.max,
        "models": models,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn templates_of_route_patterns() {
        let of = |pattern: &str| RouteTemplate::of(pattern).map(|t| (t.template, t.params));
        assert_eq!(of("/weather"), None);
        assert_eq!(of("/*"), None, "a bare wildcard names no resource");
        assert_eq!(of("/paid/*"), Some(("/paid/:var1".into(), vec!["var1".into()])));
        assert_eq!(
            of("/v1/users/:id/posts/:post"),
            Some(("/v1/users/:id/posts/:post".into(), vec!["id".into(), "post".into()]))
        );
        assert_eq!(of("/:tenant/*"), Some(("/:tenant/:var1".into(), vec!["tenant".into(), "var1".into()])));
    }

    #[test]
    fn dynamic_routes_are_listed_as_route_templates_not_patterns() {
        let toml = r#"[server]
listen = "127.0.0.1:0"
[upstreams.api]
url = "http://127.0.0.1:9"
[payment]
pay_to = "0x1111111111111111111111111111111111111111"
network = "eip155:84532"
asset = "USDC"
facilitator = "http://127.0.0.1:9"
[[routes]]
path = "/report"
upstream = "api"
price = "$0.01"
[[routes]]
path = "/paid/*"
upstream = "api"
price = "$0.001"
[[routes]]
path = "/users/:id"
methods = ["GET"]
upstream = "api"
price = "$0.002"
output = { type = "object" }
[[routes]]
path = "/*"
upstream = "api"
price = "$0.003"
"#;
        let config = Config::parse(toml, Path::new("gateway.toml"), Path::new("."), &|_| None).unwrap();
        let routes: Vec<Arc<RouteSpec>> = config.routes.into_iter().map(Arc::new).collect();
        let doc = document(&routes, "https://api.example.com", |_, _| None);
        let items = doc["items"].as_array().unwrap();
        let resources: Vec<&str> = items.iter().map(|i| i["resource"].as_str().unwrap()).collect();
        assert_eq!(
            resources,
            [
                "https://api.example.com/report",
                "https://api.example.com/paid/:var1",
                "https://api.example.com/users/:id",
                "https://api.example.com/"
            ]
        );
        assert!(items[0].get("extensions").is_none(), "an exact route declares nothing: {}", items[0]);
        let prefix = &items[1]["extensions"]["bazaar"];
        assert_eq!(prefix["routeTemplate"], "/paid/:var1");
        assert_eq!(prefix["info"]["input"]["method"], "GET");
        let path_params = &prefix["schema"]["properties"]["input"]["properties"]["pathParams"];
        assert_eq!(path_params["required"], json!(["var1"]));
        // A route that declares its schemas keeps them, with the template added (its challenges carry the same).
        let named = &items[2]["extensions"]["bazaar"];
        assert_eq!(named["routeTemplate"], "/users/:id");
        assert_eq!(named["info"]["output"]["schema"]["type"], "object");
        assert_eq!(
            named["schema"]["properties"]["input"]["properties"]["pathParams"]["properties"]["id"]["type"],
            "string"
        );
        let paid = routes[2].payment.as_ref().unwrap();
        assert_eq!(&paid.bazaar.as_ref().unwrap().extension, named);
        assert!(items[3].get("extensions").is_none(), "a bare wildcard has no template: {}", items[3]);
    }

    #[test]
    fn a_per_token_route_behind_a_remote_facilitator_names_no_facilitator_yet() {
        let toml = r#"[server]
listen = "127.0.0.1:0"
[upstreams.llm]
url = "http://127.0.0.1:9"
[payment]
pay_to = "0x1111111111111111111111111111111111111111"
network = "eip155:84532"
asset = "USDC"
facilitator = "http://127.0.0.1:9"
[[routes]]
path = "/v1/chat/completions"
upstream = "llm"
price = { by = "body.model", per_token = { a = { input = "$1/1M", output = "$2/1M" }, b = { input = "$3/1M", output = "$4/1M" } } }
"#;
        let config = Config::parse(toml, Path::new("gateway.toml"), Path::new("."), &|_| None).unwrap();
        let routes: Vec<Arc<RouteSpec>> = config.routes.into_iter().map(Arc::new).collect();
        let doc = document(&routes, "https://api.example.com", |_, _| None);
        let item = &doc["items"][0];
        let accepts = item["accepts"].as_array().unwrap();
        assert_eq!(accepts.len(), 1, "one offer for both models: {accepts:?}");
        // Learned from the facilitator's `/supported` when requests come, and named by each 402.
        assert!(accepts[0]["extra"].get("facilitatorAddress").is_none(), "{}", accepts[0]);
        assert_eq!(accepts[0]["extra"]["assetTransferMethod"], "permit2");
        assert_eq!(item["metadata"]["perToken"]["max"], "$0.50", "the default cap");
        assert_eq!(item["metadata"]["perToken"]["models"][1]["rates"][0]["inputPer1M"], "3000000");
    }
}
