//! The request pipeline, top to bottom in one place:
//! accept (proxy::server) → match route → price → payment gate → upstream → [settle] → respond.

use crate::admin;
use crate::config::{Config, Limits, PaidRoute, RouteSpec};
use crate::error::GatewayError;
use crate::gate::{GateError, Payment, PaymentGate};
use crate::proxy::body::{Body, BoxError};
use crate::proxy::cors;
use crate::proxy::upstream::{upstream_request, ClientInfo, UpstreamClient};
use crate::replay::unix_now;
use crate::routing::{self, Miss, RouteTable};
use crate::x402::challenge::Challenge;
use crate::x402::wire::ResourceInfo;
use crate::x402::Rejection;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Instant;

pub struct Gateway {
    routes: RouteTable,
    upstreams: UpstreamClient,
    gate: PaymentGate,
    limits: Limits,
    public_url: Option<String>,
}

/// What the access-log line reports besides the request and the status.
#[derive(Default)]
struct AccessLog {
    route: Option<String>,
    payment: Option<Payment>,
}

impl Gateway {
    pub fn new(config: Config) -> Gateway {
        Gateway {
            routes: RouteTable::new(config.routes),
            upstreams: UpstreamClient::new(),
            gate: PaymentGate::new(config.payment.nonce_cache_capacity),
            limits: config.server.limits,
            public_url: config.server.public_url,
        }
    }

    /// Serves one request on a public listener and writes its access-log line.
    pub async fn handle(&self, request: Request<Incoming>, client: ClientInfo) -> Response<Body> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let mut log = AccessLog::default();
        let response = match self.process(request, client, &mut log).await {
            Ok(response) => response,
            Err(err) => err.into_response(),
        };
        let payment = log.payment.as_ref();
        tracing::info!(
            target: "access",
            %method,
            path,
            route = log.route.as_deref().unwrap_or("-"),
            status = response.status().as_u16(),
            latency_ms = started.elapsed().as_secs_f64() * 1e3,
            client = %client.peer.ip(),
            payer = payment.map(|p| p.authorization.from.to_string()),
            amount = payment.map(|p| p.authorization.value.to_string()),
            network = payment.map(|p| p.offer.network.caip2.as_str()),
        );
        response
    }

    async fn process(
        &self,
        request: Request<Incoming>,
        client: ClientInfo,
        log: &mut AccessLog,
    ) -> Result<Response<Body>, GatewayError> {
        let canonical_path = routing::canonicalize(request.uri().path())?;
        if let Some(response) = self.paid_route_preflight(&request, &canonical_path) {
            return Ok(response);
        }
        let route = self.match_route(&request, &canonical_path)?;
        log.route = Some(route.pattern_text.clone());
        let request = self.limit_body(request)?;
        if let Some(paid) = &route.payment {
            match self.gate.check(paid, request.headers(), unix_now()) {
                Ok(payment) => log.payment = Some(payment),
                Err(GateError::Challenge(rejection)) => {
                    return Ok(self.challenge(&request, paid, rejection.as_ref(), client));
                }
                Err(GateError::Malformed(message)) => return Err(GatewayError::MalformedPayment(message)),
                Err(GateError::Busy) => return Err(GatewayError::PaymentsBusy),
            }
        }
        let request = upstream_request(request, &route, &canonical_path, client)?;
        self.upstreams.send(request, &route.upstream).await
    }

    fn match_route<B>(&self, request: &Request<B>, canonical_path: &str) -> Result<Arc<RouteSpec>, GatewayError> {
        match self.routes.lookup(request.method(), canonical_path) {
            Ok(route) => Ok(route.clone()),
            Err(Miss::NotFound) => Err(GatewayError::NoRoute),
            Err(Miss::MethodNotAllowed(allowed)) => Err(GatewayError::MethodNotAllowed(allowed)),
        }
    }

    /// A CORS preflight for a paid route is answered here, free; other preflights go to their route.
    fn paid_route_preflight<B>(&self, request: &Request<B>, canonical_path: &str) -> Option<Response<Body>> {
        let method = cors::preflight_method(request)?;
        let route = self.routes.lookup(&method, canonical_path).ok()?;
        route.payment.as_ref()?;
        Some(cors::preflight_response(request.headers(), &method))
    }

    fn challenge<B>(
        &self,
        request: &Request<B>,
        paid: &PaidRoute,
        rejection: Option<&Rejection>,
        client: ClientInfo,
    ) -> Response<Body> {
        let resource = ResourceInfo {
            url: self.resource_url(request, client),
            description: paid.description.clone(),
            mime_type: paid.mime_type.clone(),
        };
        Challenge { offers: &paid.offers, resource, rejection }.response(request.headers())
    }

    /// The URL buyers paid for: `server.public_url` if set, else what the request says it asked for.
    fn resource_url<B>(&self, request: &Request<B>, client: ClientInfo) -> String {
        let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
        match &self.public_url {
            Some(base) => format!("{base}{path_and_query}"),
            None => {
                let host = request
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .or_else(|| request.uri().authority().map(|a| a.as_str()))
                    .unwrap_or("localhost");
                format!("{}://{host}{path_and_query}", client.proto)
            }
        }
    }

    /// Refuses a declared oversized body at once, and caps a streamed one as it passes.
    fn limit_body(&self, request: Request<Incoming>) -> Result<Request<Body>, GatewayError> {
        let limit = self.limits.max_body_bytes;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit) {
            return Err(GatewayError::BodyTooLarge);
        }
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(request.map(|body| Limited::new(body, limit).map_err(BoxError::from).boxed_unsync()))
    }

    pub async fn handle_admin(&self, request: Request<Incoming>) -> Response<Body> {
        admin::respond(&request)
    }
}
