//! The request pipeline, top to bottom in one place:
//! accept (proxy::server) → match route → price → payment gate → upstream → [settle] → respond.

use crate::admin;
use crate::config::{Config, FacilitatorChoice, Limits, PaidRoute, RouteSpec};
use crate::error::GatewayError;
use crate::gate::{GateError, Payment, PaymentGate};
use crate::proxy::body::{full, Body, BoxError};
use crate::proxy::cors;
use crate::proxy::upstream::{upstream_request, ClientInfo, UpstreamClient};
use crate::replay::unix_now;
use crate::respond;
use crate::routing::{self, Miss, RouteTable};
use crate::settlement::{Facilitator, Facilitators, SettleFailure, SettleMode, VerifyFailure};
use crate::x402::challenge::{Challenge, SCHEME_EXACT};
use crate::x402::wire::ResourceInfo;
use crate::x402::Rejection;
use bytes::{Bytes, BytesMut};
use http::{header, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Instant;

pub struct Gateway {
    routes: RouteTable,
    upstreams: UpstreamClient,
    gate: PaymentGate,
    facilitators: Facilitators,
    limits: Limits,
    public_url: Option<String>,
    settle_after_max_bytes: usize,
}

/// What the access-log line reports besides the request and the status.
#[derive(Default)]
struct AccessLog {
    route: Option<String>,
    payment: Option<Payment>,
    transaction: Option<String>,
}

/// A verified, reserved payment on its way through the upstream and settlement stages.
struct PaidCall<'g, 'l> {
    facilitator: Facilitator<'g>,
    payment: Payment,
    resource: ResourceInfo,
    log: &'l mut AccessLog,
}

impl Gateway {
    pub fn new(config: Config) -> Gateway {
        Gateway {
            facilitators: Facilitators::new(&config.payment, &config.routes),
            routes: RouteTable::new(config.routes),
            upstreams: UpstreamClient::new(),
            gate: PaymentGate::new(config.payment.nonce_cache_capacity),
            limits: config.server.limits,
            public_url: config.server.public_url,
            settle_after_max_bytes: config.payment.settle_after_max_bytes,
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
            transaction = log.transaction.as_deref(),
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
        let Some(paid) = &route.payment else {
            let request = upstream_request(request, &route, &canonical_path, client)?;
            return self.upstreams.send(request, &route.upstream).await;
        };

        let resource = self.resource_info(&request, paid, client);
        let payment = match self.gate.check(paid, request.headers(), unix_now()) {
            Ok(payment) => payment,
            Err(GateError::Challenge(rejection)) => return Ok(challenge(&request, paid, resource, rejection.as_ref())),
            Err(GateError::Malformed(message)) => return Err(GatewayError::MalformedPayment(message)),
            Err(GateError::Busy) => return Err(GatewayError::PaymentsBusy),
        };
        let Some(facilitator) = self.facilitators.get(&paid.facilitator, payment.offer.network.chain_id) else {
            self.gate.release(&payment);
            return Err(GatewayError::FacilitatorUnavailable("no facilitator for this network".into()));
        };
        if let Err(failure) = facilitator.verify(&payment, &resource).await {
            self.gate.release(&payment);
            return match failure {
                VerifyFailure::Rejected(rejection) => Ok(challenge(&request, paid, resource, Some(&rejection))),
                VerifyFailure::Unavailable(why) => Err(GatewayError::FacilitatorUnavailable(why)),
            };
        }
        log.payment = Some(payment.clone());

        let request = upstream_request(request, &route, &canonical_path, client)?;
        let paid_call = PaidCall { facilitator, payment, resource, log };
        match paid.settle {
            SettleMode::Before => self.settle_then_stream(request, &route, paid_call).await,
            SettleMode::After => self.deliver_then_settle(request, &route, paid_call).await,
        }
    }

    /// `settle = "before"`: the payment settles first, then the answer streams through with its receipt.
    async fn settle_then_stream(
        &self,
        request: Request<Body>,
        route: &RouteSpec,
        call: PaidCall<'_, '_>,
    ) -> Result<Response<Body>, GatewayError> {
        let settled = match call.facilitator.settle(&call.payment, &call.resource).await {
            Ok(settled) => settled,
            Err(failure) => return Ok(self.settle_failed(&call.payment, &failure)),
        };
        call.log.transaction = Some(settled.transaction.clone());
        let mut response = match self.upstreams.send(request, &route.upstream).await {
            Ok(response) => response,
            Err(err) => err.into_response(),
        };
        if response.status().is_client_error() || response.status().is_server_error() {
            tracing::error!(
                transaction = %settled.transaction,
                payer = %call.payment.authorization.from,
                status = response.status().as_u16(),
                "the upstream failed after the payment settled: the buyer paid for a failed answer",
            );
        }
        respond::attach_receipt(&mut response, &call.payment, &settled);
        Ok(response)
    }

    /// `settle = "after"`: the answer is held until the payment settles; a failed answer is not charged.
    async fn deliver_then_settle(
        &self,
        request: Request<Body>,
        route: &RouteSpec,
        call: PaidCall<'_, '_>,
    ) -> Result<Response<Body>, GatewayError> {
        let response = match self.upstreams.send(request, &route.upstream).await {
            Ok(response) => response,
            Err(err) => {
                self.gate.release(&call.payment);
                return Err(err);
            }
        };
        if response.status().is_client_error() || response.status().is_server_error() {
            self.gate.release(&call.payment);
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let body = match read_to_limit(body, self.settle_after_max_bytes).await {
            Ok(body) => body,
            Err(err) => {
                self.gate.release(&call.payment);
                return Err(err);
            }
        };
        match call.facilitator.settle(&call.payment, &call.resource).await {
            Ok(settled) => {
                call.log.transaction = Some(settled.transaction.clone());
                let mut response = Response::from_parts(parts, full(body));
                respond::attach_receipt(&mut response, &call.payment, &settled);
                Ok(response)
            }
            Err(failure) => Ok(self.settle_failed(&call.payment, &failure)),
        }
    }

    fn settle_failed(&self, payment: &Payment, failure: &SettleFailure) -> Response<Body> {
        if failure.nothing_moved {
            self.gate.release(payment);
        }
        tracing::warn!(
            reason = %failure.reason,
            message = %failure.message,
            transaction = failure.transaction.as_deref(),
            payer = %payment.authorization.from,
            "settlement failed; the answer is withheld",
        );
        respond::settle_failed(payment, failure)
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

    fn resource_info<B>(&self, request: &Request<B>, paid: &PaidRoute, client: ClientInfo) -> ResourceInfo {
        ResourceInfo {
            url: self.resource_url(request, client),
            description: paid.description.clone(),
            mime_type: paid.mime_type.clone(),
        }
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

    /// Asks each remote facilitator what it supports (`GET /supported`, as the reference servers do at start)
    /// and returns a warning for every paid offer it cannot settle.
    pub async fn facilitator_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (url, facilitator) in self.facilitators.remotes() {
            let kinds = match facilitator.supported().await {
                Ok(supported) => supported.get("kinds").and_then(|k| k.as_array()).cloned().unwrap_or_default(),
                Err(why) => {
                    warnings.push(format!("facilitator {url} cannot be asked what it supports: {why}"));
                    continue;
                }
            };
            let serves = |network: &str| {
                kinds.iter().any(|k| k["x402Version"] == 2 && k["scheme"] == SCHEME_EXACT && k["network"] == network)
            };
            for route in self.routes.routes() {
                let Some(paid) = route.payment.as_ref() else { continue };
                if !matches!(&paid.facilitator, FacilitatorChoice::Remote(remote) if remote.url == *url) {
                    continue;
                }
                for offer in paid.offers.iter().filter(|o| !serves(&o.network.caip2)) {
                    warnings.push(format!(
                        "facilitator {url} does not list exact payments on {} (route {})",
                        offer.network.caip2, route.pattern_text
                    ));
                }
            }
        }
        warnings
    }

    pub async fn handle_admin(&self, request: Request<Incoming>) -> Response<Body> {
        admin::respond(&request)
    }
}

/// A 402 challenge for `paid`, rendered for the client that asked.
fn challenge<B>(
    request: &Request<B>,
    paid: &PaidRoute,
    resource: ResourceInfo,
    rejection: Option<&Rejection>,
) -> Response<Body> {
    Challenge { offers: &paid.offers, resource, rejection }.response(request.headers())
}

/// Reads an answer to its end, refusing more than `limit` bytes.
async fn read_to_limit(mut body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| GatewayError::UpstreamUnavailable)?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > limit {
                return Err(GatewayError::AnswerTooLarge);
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}
