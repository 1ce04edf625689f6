//! The per-configuration parts of the pipeline: route matching, pricing input, catalogues and URLs.

use super::buffered::{BodyBudget, Held};
use super::Live;
use crate::body::{full, Body, BoxError, ClientBodyError};
use crate::config::{PaidRoute, RouteSpec};
use crate::error::GatewayError;
use crate::pricing::{PriceError, Priced, Pricing};
use crate::proxy::cors;
use crate::proxy::upstream::ClientInfo;
use crate::routing::Miss;
use crate::x402::wire::ResourceInfo;
use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::sync::Arc;

impl Live {
    pub(super) fn match_route<B>(
        &self,
        request: &Request<B>,
        canonical_path: &str,
    ) -> Result<Arc<RouteSpec>, GatewayError> {
        match self.routes.lookup(request.method(), canonical_path) {
            Ok(route) => Ok(route.clone()),
            Err(Miss::NotFound) => Err(GatewayError::NoRoute),
            Err(Miss::MethodNotAllowed(allowed)) => Err(GatewayError::MethodNotAllowed(allowed)),
        }
    }

    /// A CORS preflight for a paid route is answered here, free; other preflights go to their route.
    pub(super) fn paid_route_preflight<B>(&self, request: &Request<B>, canonical_path: &str) -> Option<Response<Body>> {
        let method = cors::preflight_method(request)?;
        let route = self.routes.lookup(&method, canonical_path).ok()?;
        route.payment.as_ref()?;
        Some(cors::preflight_response(request.headers(), &method))
    }

    /// What is sold: the route's description, naming the value that priced it (the model) if any.
    pub(super) fn resource_info<B>(
        &self,
        request: &Request<B>,
        paid: &PaidRoute,
        price_key: Option<&str>,
        client: &ClientInfo,
    ) -> ResourceInfo {
        let description = match (price_key, paid.description.as_str()) {
            (None, description) => description.to_string(),
            (Some(key), "") => key.to_string(),
            (Some(key), description) => format!("{description} ({key})"),
        };
        ResourceInfo { url: self.resource_url(request, client), description, mime_type: paid.mime_type.clone() }
    }

    /// A route priced by its body needs the body before the 402: read it (within `max_body_bytes`, the
    /// deadline and the budget for buffered bodies), and forward the very same bytes. The returned share of
    /// the budget is held as long as the caller keeps it.
    pub(super) async fn buffer_body_for_pricing<'b>(
        &self,
        request: Request<Body>,
        paid: &PaidRoute,
        budget: &'b BodyBudget,
    ) -> Result<(Request<Body>, Bytes, Option<Held<'b>>), GatewayError> {
        if !paid.pricing.needs_body() {
            return Ok((request, Bytes::new(), None));
        }
        let (parts, body) = request.into_parts();
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let (bytes, held) = budget.read(body, limit, declared_length(&parts.headers)).await?;
        Ok((Request::from_parts(parts, full(bytes.clone())), bytes, Some(held)))
    }

    /// The offers for exactly this request (its query, headers and body as read for pricing). A per-token route's name the
    /// facilitator's `upto` signer.
    pub(super) async fn price<'p>(
        &self,
        paid: &'p PaidRoute,
        query: Option<&str>,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Result<Priced<'p>, PriceError> {
        self.learn_upto_signers(paid).await;
        let upto_signer = |chain_id| self.facilitators.get(&paid.facilitator, chain_id)?.upto_signer(chain_id);
        paid.pricing.price(query, headers, body, upto_signer)
    }

    /// A per-token route's offers name the facilitator's `upto` signer: asked for first when it is not known
    /// yet (a remote facilitator announces it in `/supported`, which is asked at a bounded rate).
    async fn learn_upto_signers(&self, paid: &PaidRoute) {
        let Pricing::PerToken(metering) = &paid.pricing else { return };
        for offer in &metering.offers {
            let chain_id = offer.network.chain_id;
            if let Some(facilitator) = self.facilitators.get(&paid.facilitator, chain_id) {
                if facilitator.upto_signer(chain_id).is_none() {
                    facilitator.learn_upto_signers().await;
                }
            }
        }
    }

    pub(super) fn catalogue<B>(&self, request: &Request<B>, canonical_path: &str) -> Option<Response<Body>> {
        if request.method() != http::Method::GET {
            return None;
        }
        let list = self.catalogues.get(canonical_path.trim_end_matches('/'))?;
        let mut response = Response::new(full(list.clone()));
        response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        Some(response)
    }

    /// The URL buyers paid for: under `server.public_url` if set, else what the request says it asked for.
    pub(super) fn resource_url<B>(&self, request: &Request<B>, client: &ClientInfo) -> String {
        let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
        format!("{}{path_and_query}", self.base_url(request, client))
    }

    /// How buyers reach this gateway: `server.public_url`, or the scheme and host the request used.
    pub(super) fn base_url<B>(&self, request: &Request<B>, client: &ClientInfo) -> String {
        if let Some(base) = &self.public_url {
            return base.clone();
        }
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()))
            .unwrap_or("localhost");
        format!("{}://{host}", client.proto)
    }

    /// Refuses a declared oversized body at once, and caps a streamed one as it passes.
    pub(super) fn limit_body(&self, request: Request<Incoming>) -> Result<Request<Body>, GatewayError> {
        let limit = self.max_body_bytes;
        if declared_length(request.headers()).is_some_and(|len| len > limit) {
            return Err(GatewayError::BodyTooLarge);
        }
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(request
            .map(|body| Limited::new(body, limit).map_err(|err| BoxError::from(ClientBodyError(err))).boxed_unsync()))
    }
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}
