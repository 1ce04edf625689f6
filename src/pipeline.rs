//! The request pipeline, top to bottom in one place:
//! accept (proxy::server) → match route → price → payment gate → upstream → [settle] → respond.

use crate::admin;
use crate::catalogue;
use crate::config::{Bazaar, Config, FacilitatorChoice, PaidRoute, RouteSpec};
use crate::discovery;
use crate::error::GatewayError;
use crate::gate::{GateError, Payment, PaymentGate};
use crate::metrics::Metrics;
use crate::pricing::Offer;
use crate::proxy::body::{full, Body, BoxError};
use crate::proxy::cors;
use crate::proxy::upstream::{upstream_request, ClientInfo, UpstreamClient};
use crate::replay::unix_now;
use crate::respond;
use crate::routing::{self, Miss, RouteTable};
use crate::settlement::{Facilitator, Facilitators, SettleFailure, SettleMode, Settled, VerifyFailure};
use crate::usage::{OnEnd, UsageTap};
use crate::x402::challenge::{Challenge, SCHEME_EXACT};
use crate::x402::wire::ResourceInfo;
use crate::x402::Rejection;
use bytes::{Bytes, BytesMut};
use http::{header, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

pub struct Gateway {
    /// The current configuration's routes and settlers, replaced whole by a reload: a request keeps the
    /// `Live` it started with.
    live: RwLock<Arc<Live>>,
    upstreams: UpstreamClient,
    /// Outlives reloads: an authorization reserved under the old configuration stays reserved.
    gate: PaymentGate,
    metrics: Metrics,
}

/// Everything one configuration decides, built once when it is loaded.
pub struct Live {
    routes: RouteTable,
    facilitators: Facilitators,
    /// Catalogue answers by path.
    catalogues: BTreeMap<String, Bytes>,
    max_body_bytes: u64,
    public_url: Option<String>,
    settle_after_max_bytes: usize,
}

impl Live {
    fn new(config: Config, previous: Option<&Live>) -> Live {
        Live {
            facilitators: Facilitators::new(&config.payment, &config.routes, previous.map(|p| &p.facilitators)),
            catalogues: catalogue::build(&config.routes),
            routes: RouteTable::new(config.routes),
            max_body_bytes: config.server.limits.max_body_bytes,
            public_url: config.server.public_url,
            settle_after_max_bytes: config.payment.settle_after_max_bytes,
        }
    }
}

/// What the access-log line reports besides the request and the status.
#[derive(Default)]
struct AccessLog {
    route: Option<String>,
    payment: Option<Payment>,
    transaction: Option<String>,
    /// The request value that set the price (the model, for an LLM route).
    price_key: Option<String>,
}

/// A verified, reserved payment on its way through the upstream and settlement stages.
struct PaidCall<'g, 'l> {
    facilitator: Facilitator<'g>,
    payment: Payment,
    resource: ResourceInfo,
    log: &'l mut AccessLog,
    /// Largest answer held back under `settle = "after"`.
    max_held: usize,
}

impl Gateway {
    pub fn new(config: Config) -> Gateway {
        Gateway {
            gate: PaymentGate::new(config.payment.nonce_cache_capacity),
            live: RwLock::new(Arc::new(Live::new(config, None))),
            upstreams: UpstreamClient::new(),
            metrics: Metrics::new(),
        }
    }

    /// The configuration new requests are served with.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Serves new requests with `config`, atomically; requests in flight finish with the one they started
    /// with. Listener settings (`[server]` addresses, TLS, connection limits) and the nonce cache's capacity
    /// are kept: they take a restart.
    pub fn reload(&self, config: Config) {
        let previous = self.live();
        let next = Arc::new(Live::new(config, Some(&previous)));
        *self.live.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = next;
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves one request on a public listener and writes its access-log line.
    pub async fn handle(&self, request: Request<Incoming>, client: ClientInfo) -> Response<Body> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let mut log = AccessLog::default();
        let live = self.live();
        self.metrics.in_flight.inc();
        let response = match self.process(&live, request, client, &mut log).await {
            Ok(response) => response,
            Err(err) => err.into_response(),
        };
        self.metrics.in_flight.dec();
        self.metrics.request(log.route.as_deref().unwrap_or("-"), response.status().as_u16());
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
        live: &Live,
        request: Request<Incoming>,
        client: ClientInfo,
        log: &mut AccessLog,
    ) -> Result<Response<Body>, GatewayError> {
        let canonical_path = routing::canonicalize(request.uri().path())?;
        if let Some(response) = live.paid_route_preflight(&request, &canonical_path) {
            return Ok(response);
        }
        if let Some(list) = live.catalogue(&request, &canonical_path) {
            return Ok(list);
        }
        if request.method() == http::Method::GET && canonical_path == discovery::PATH {
            let document = discovery::document(live.routes.routes(), &live.base_url(&request, client));
            return Ok(crate::proxy::body::json_response(http::StatusCode::OK, &document));
        }
        let route = live.match_route(&request, &canonical_path)?;
        log.route = Some(route.pattern_text.clone());
        let request = live.limit_body(request)?;
        let Some(paid) = &route.payment else {
            let request = upstream_request(request, &route, &canonical_path, client)?;
            return self.forward(request, &route).await;
        };
        let route_name = route.pattern_text.as_str();

        let (request, body) = live.buffer_body_for_pricing(request, paid).await?;
        let priced =
            paid.pricing.price(request.uri().query(), request.headers(), &body).map_err(GatewayError::Price)?;
        let offers = priced.offers;
        let resource = live.resource_info(&request, paid, priced.key.as_deref(), client);
        let payment = match self.gate.check(offers, request.headers(), unix_now()) {
            Ok(payment) => payment,
            Err(GateError::Challenge(rejection)) => {
                return Ok(self.challenge(
                    route_name,
                    paid.bazaar.as_ref(),
                    &request,
                    offers,
                    resource,
                    rejection.as_ref(),
                ))
            }
            Err(GateError::Malformed(message)) => {
                self.metrics.rejected(route_name, "invalid_payload");
                return Err(GatewayError::MalformedPayment(message));
            }
            Err(GateError::Busy) => return Err(GatewayError::PaymentsBusy),
        };
        let Some(facilitator) = live.facilitators.get(&paid.facilitator, payment.offer.network.chain_id) else {
            self.gate.release(&payment);
            return Err(GatewayError::FacilitatorUnavailable("no facilitator for this network".into()));
        };
        let verifying = Instant::now();
        if let Err(failure) = facilitator.verify(&payment, &resource).await {
            self.gate.release(&payment);
            return match failure {
                VerifyFailure::Rejected(rejection) => {
                    Ok(self.challenge(route_name, paid.bazaar.as_ref(), &request, offers, resource, Some(&rejection)))
                }
                VerifyFailure::Unavailable(why) => Err(GatewayError::FacilitatorUnavailable(why)),
            };
        }
        self.metrics.verified(route_name, verifying.elapsed());
        log.payment = Some(payment.clone());
        log.price_key = priced.key;

        let request = upstream_request(request, &route, &canonical_path, client)?;
        let paid_call = PaidCall { facilitator, payment, resource, log, max_held: live.settle_after_max_bytes };
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
        let settled = match self.settle(route, &call).await {
            Ok(settled) => settled,
            Err(failure) => return Ok(self.settle_failed(&call.payment, &failure)),
        };
        call.log.transaction = Some(settled.transaction.clone());
        let mut response = match self.forward(request, route).await {
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
        Ok(record_usage(response, route, call.log))
    }

    /// `settle = "after"`: the answer is held until the payment settles; a failed answer is not charged.
    async fn deliver_then_settle(
        &self,
        request: Request<Body>,
        route: &RouteSpec,
        call: PaidCall<'_, '_>,
    ) -> Result<Response<Body>, GatewayError> {
        let response = match self.forward(request, route).await {
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
        let body = match read_to_limit(body, call.max_held).await {
            Ok(body) => body,
            Err(err) => {
                self.gate.release(&call.payment);
                return Err(match err {
                    ReadError::TooLarge => GatewayError::AnswerTooLarge,
                    ReadError::Broken => GatewayError::UpstreamUnavailable,
                });
            }
        };
        match self.settle(route, &call).await {
            Ok(settled) => {
                call.log.transaction = Some(settled.transaction.clone());
                let mut response = Response::from_parts(parts, full(body));
                respond::attach_receipt(&mut response, &call.payment, &settled);
                Ok(record_usage(response, route, call.log))
            }
            Err(failure) => Ok(self.settle_failed(&call.payment, &failure)),
        }
    }

    async fn forward(&self, request: Request<Body>, route: &RouteSpec) -> Result<Response<Body>, GatewayError> {
        let started = Instant::now();
        let answer = self.upstreams.send(request, &route.upstream).await;
        self.metrics.upstream(started.elapsed());
        answer
    }

    async fn settle(&self, route: &RouteSpec, call: &PaidCall<'_, '_>) -> Result<Settled, SettleFailure> {
        let started = Instant::now();
        let outcome = call.facilitator.settle(&call.payment, &call.resource).await;
        let route = route.pattern_text.as_str();
        match &outcome {
            Ok(_) => {
                self.metrics.settled(route, "success", started.elapsed());
                let offer = &call.payment.offer;
                let amount = u64::try_from(call.payment.authorization.value).unwrap_or(u64::MAX);
                self.metrics.revenue(route, &offer.network.caip2, &offer.asset.address.to_string(), amount);
            }
            Err(failure) => self.metrics.settled(route, &failure.reason, started.elapsed()),
        }
        outcome
    }

    /// A 402 challenge for `offers`, rendered for the client that asked, and counted.
    fn challenge<B>(
        &self,
        route: &str,
        bazaar: Option<&Bazaar>,
        request: &Request<B>,
        offers: &[Offer],
        resource: ResourceInfo,
        rejection: Option<&Rejection>,
    ) -> Response<Body> {
        self.metrics.challenge(route);
        if let Some(rejection) = rejection {
            self.metrics.rejected(route, rejection.reason());
        }
        Challenge { offers, resource, rejection, bazaar }.response(request.headers())
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

    /// Asks each remote facilitator what it supports (`GET /supported`, as the reference servers do at start)
    /// and returns a warning for every paid offer it cannot settle.
    pub async fn facilitator_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let live = self.live();
        for (url, facilitator) in live.facilitators.remotes() {
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
            for route in live.routes.routes() {
                let Some(paid) = route.payment.as_ref() else { continue };
                if !matches!(&paid.facilitator, FacilitatorChoice::Remote(remote) if remote.url == *url) {
                    continue;
                }
                let offers = paid.pricing.all_offers();
                let mut networks: Vec<&str> =
                    offers.iter().flat_map(|(_, o)| o.iter()).map(|o| o.network.caip2.as_str()).collect();
                networks.dedup();
                for network in networks.into_iter().filter(|n| !serves(n)) {
                    warnings.push(format!(
                        "facilitator {url} does not list exact payments on {network} (route {})",
                        route.pattern_text
                    ));
                }
            }
        }
        warnings
    }

    pub async fn handle_admin(&self, request: Request<Incoming>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&http::Method::GET, "/healthz") => admin::healthz(),
            (&http::Method::GET, "/readyz") => admin::readyz(self.live().facilitators.readiness().await),
            (&http::Method::GET, "/metrics") => admin::metrics(self.metrics.render(self.gate.reserved())),
            _ => admin::not_found(),
        }
    }
}

enum ReadError {
    TooLarge,
    Broken,
}

/// Reads a body to its end, refusing more than `limit` bytes.
async fn read_to_limit(mut body: Body, limit: usize) -> Result<Bytes, ReadError> {
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ReadError::Broken)?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > limit {
                return Err(ReadError::TooLarge);
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

/// Logs the LLM token usage of a paid answer with its payment, once the answer has gone out.
fn record_usage(response: Response<Body>, route: &RouteSpec, log: &AccessLog) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let route = route.pattern_text.clone();
    let payer = log.payment.as_ref().map(|p| p.authorization.from.to_string());
    let amount = log.payment.as_ref().map(|p| p.authorization.value.to_string());
    let (transaction, model) = (log.transaction.clone(), log.price_key.clone());
    let on_end: OnEnd = Box::new(move |usage, complete| {
        if let Some(usage) = usage {
            tracing::info!(
                target: "usage",
                route,
                payer,
                amount,
                transaction,
                model,
                prompt_tokens = usage.prompt_tokens,
                completion_tokens = usage.completion_tokens,
                complete,
            );
        }
    });
    let tapped = UsageTap::new(body, content_type, on_end);
    Response::from_parts(parts, tapped.boxed_unsync())
}

impl Live {
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

    /// What is sold: the route's description, naming the value that priced it (the model) if any.
    fn resource_info<B>(
        &self,
        request: &Request<B>,
        paid: &PaidRoute,
        price_key: Option<&str>,
        client: ClientInfo,
    ) -> ResourceInfo {
        let description = match (price_key, paid.description.as_str()) {
            (None, description) => description.to_string(),
            (Some(key), "") => key.to_string(),
            (Some(key), description) => format!("{description} ({key})"),
        };
        ResourceInfo { url: self.resource_url(request, client), description, mime_type: paid.mime_type.clone() }
    }

    /// A route priced by its body needs the body before the 402: read it (within `max_body_bytes`), and
    /// forward the very same bytes.
    async fn buffer_body_for_pricing(
        &self,
        request: Request<Body>,
        paid: &PaidRoute,
    ) -> Result<(Request<Body>, Bytes), GatewayError> {
        if !paid.pricing.needs_body() {
            return Ok((request, Bytes::new()));
        }
        let (parts, body) = request.into_parts();
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let bytes = read_to_limit(body, limit).await.map_err(|err| match err {
            ReadError::TooLarge => GatewayError::BodyTooLarge,
            ReadError::Broken => GatewayError::BodyUnreadable,
        })?;
        Ok((Request::from_parts(parts, full(bytes.clone())), bytes))
    }

    fn catalogue<B>(&self, request: &Request<B>, canonical_path: &str) -> Option<Response<Body>> {
        if request.method() != http::Method::GET {
            return None;
        }
        let list = self.catalogues.get(canonical_path.trim_end_matches('/'))?;
        let mut response = Response::new(full(list.clone()));
        response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        Some(response)
    }

    /// The URL buyers paid for: under `server.public_url` if set, else what the request says it asked for.
    fn resource_url<B>(&self, request: &Request<B>, client: ClientInfo) -> String {
        let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
        format!("{}{path_and_query}", self.base_url(request, client))
    }

    /// How buyers reach this gateway: `server.public_url`, or the scheme and host the request used.
    fn base_url<B>(&self, request: &Request<B>, client: ClientInfo) -> String {
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
    fn limit_body(&self, request: Request<Incoming>) -> Result<Request<Body>, GatewayError> {
        let limit = self.max_body_bytes;
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
}
