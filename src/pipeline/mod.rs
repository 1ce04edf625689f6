//! The request pipeline, top to bottom in one place:
//! accept (proxy::server) → match route → price → payment gate → verify → record → upstream ⇄ settle → respond.
//! `live` holds what one configuration decides; `paid` the stages of a paid call; `shadow` a paid route's
//! call in shadow mode (priced and offered, served free).

mod buffered;
mod context;
mod interrupted;
mod live;
mod metered;
mod paid;
mod shadow;

use crate::admin;
use crate::answers::{AnswerCache, PaidAnswers};
use crate::attempts::AttemptLimiter;
use crate::body::Body;
use crate::carrier::{Carrier, HttpHeaders};
use crate::catalogue;
use crate::chain;
use crate::config::{Bazaar, Config, FacilitatorChoice, RemoteSet, RouteSpec};
use crate::discovery;
use crate::error::GatewayError;
use crate::gate::{GateError, Payment, PaymentGate};
use crate::ledger::{self, Ledger, LedgerError, NewPayment, PaymentStore, Reconciled};
use crate::metering;
use crate::metrics::Metrics;
use crate::options::{PaidRoute, PaymentMode};
use crate::pricing::{Offer, Pricing};
use crate::proxy::headers::names_host;
use crate::proxy::server::{Handler, Server};
use crate::proxy::upstream::{self, upstream_request, ClientInfo};
use crate::replay::{unix_now, NonceKey};
use crate::routing::{self, RouteTable};
use crate::settlement::{Facilitators, SettleMode, VerifyFailure};
use crate::x402::challenge::{Challenge, SCHEME_EXACT};
use crate::x402::wire::ResourceInfo;
use crate::x402::Rejection;
use alloy::providers::RootProvider;
use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use buffered::BodyBudget;
use context::RequestContext;
use paid::PaidCall;

/// Rows younger than this are left to the request that is handling them (long streams included).
const RECONCILE_GRACE: Duration = Duration::from_secs(300);
/// Beyond the settlement timeout, before a `settling` row is decided by reconciliation.
const SETTLING_MARGIN: Duration = Duration::from_secs(30);

pub struct Gateway {
    /// The current configuration's routes and settlers, replaced whole by a reload: a request keeps the
    /// `Live` it started with.
    live: ArcSwap<Live>,
    /// Outlives reloads: an authorization reserved under the old configuration stays reserved.
    gate: PaymentGate,
    /// The payment ledger (SQLite).
    ledger: Arc<dyn PaymentStore>,
    /// Paid answers kept for retries.
    answers: Box<dyn AnswerCache>,
    /// Request bodies read whole before the 402, across requests.
    buffered: BodyBudget,
    /// Requests carrying a payment, per client address.
    attempts: AttemptLimiter,
    /// How payments arrive and how the 402 and the receipt leave.
    carrier: HttpHeaders,
    reconcile_interval: Duration,
    reconcile_log_chunk_blocks: std::num::NonZeroU64,
    /// A `settling` row this old had time to land: reconciliation may decide it.
    settling_grace: Duration,
    metrics: Metrics,
    /// The ceilings of the `upto` payments being served, by payer.
    outstanding: Arc<metered::Outstanding>,
    /// The rows of the `upto` streams being served.
    streams: Arc<interrupted::LiveStreams>,
}

/// Everything one configuration decides, built once when it is loaded.
pub struct Live {
    routes: RouteTable,
    facilitators: Facilitators,
    /// Nodes of the configured networks (`rpc_url`), for reconciliation.
    chains: HashMap<u64, RootProvider>,
    /// Catalogue answers by path.
    catalogues: BTreeMap<String, Bytes>,
    max_body_bytes: u64,
    public_url: Option<String>,
    settle_after_max_bytes: usize,
}

impl Live {
    fn new(config: Config, previous: Option<&Live>) -> Live {
        let chains = config
            .payment
            .networks
            .values()
            .filter_map(|n| {
                Some((n.chain_id, chain::connect(&n.rpc_url.as_deref()?.parse().ok()?, Duration::from_secs(15))))
            })
            .collect();
        Live {
            facilitators: Facilitators::new(
                &config.payment.settlers,
                &config.payment.settlement(),
                config.routes.iter().filter_map(|route| match &route.payment.as_ref()?.facilitator {
                    FacilitatorChoice::Remote(remote) => Some(remote),
                    FacilitatorChoice::Local => None,
                }),
                previous.map(|p| &p.facilitators),
            ),
            catalogues: catalogue::build(&config.routes),
            chains,
            routes: RouteTable::new(config.routes),
            max_body_bytes: config.server.limits.max_body_bytes,
            public_url: config.server.public_url,
            settle_after_max_bytes: config.payment.settle_after_max_bytes,
        }
    }
}

/// Where a request goes once routed.
enum Next {
    /// The gateway's own answer: a preflight, a catalogue, the discovery document.
    Answer(Response<Body>),
    /// A free route: the upstream request, ready to send.
    Forward(Request<Body>, Arc<RouteSpec>),
    /// A paid route, with the request's canonical path.
    Pay(Request<Body>, Arc<RouteSpec>, String),
    /// A paid route in shadow mode, with the request's canonical path: forwarded free, with the offer.
    Shadow(Request<Body>, Arc<RouteSpec>, String),
}

impl Gateway {
    /// Opens the ledger and re-reserves every authorization it says is spent and not yet expired, so replay
    /// protection survives a restart.
    pub async fn new(config: Config) -> Result<Gateway, LedgerError> {
        for addr in config.server.public_listeners_without_public_url() {
            tracing::warn!(%addr, "no server.public_url: challenges and discovery on this listener take their resource URLs from the client's Host header");
        }
        let ledger = Ledger::open(&config.ledger.path)?;
        let gate = PaymentGate::new(config.payment.nonce_cache_capacity);
        for row in ledger.unexpired_spent(unix_now()).await? {
            gate.reserve_spent(nonce_key(&row), row.valid_before);
        }
        let settings = &config.ledger;
        let limits = &config.server.limits;
        Ok(Gateway {
            buffered: BodyBudget::new(limits.max_buffered_body_bytes, limits.body_read_timeout),
            attempts: AttemptLimiter::new(config.payment.attempts_per_ip),
            carrier: HttpHeaders,
            answers: Box::new(PaidAnswers::new(
                settings.answers_max_bytes,
                settings.answers_max_body_bytes,
                settings.answers_ttl,
            )),
            reconcile_interval: settings.reconcile_interval,
            reconcile_log_chunk_blocks: settings.reconcile_log_chunk_blocks,
            settling_grace: config.payment.settle_timeout + SETTLING_MARGIN,
            gate,
            ledger: Arc::new(ledger),
            live: ArcSwap::from_pointee(Live::new(config, None)),
            metrics: Metrics::new(),
            outstanding: Arc::default(),
            streams: Arc::default(),
        })
    }

    /// The configuration new requests are served with.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Serves new requests with `config`, atomically; requests in flight finish with the one they started
    /// with. Listener settings (`[server]` addresses, TLS, connection limits), the nonce cache's capacity and
    /// `[ledger]` are kept: they take a restart.
    pub fn reload(&self, config: Config) {
        let previous = self.live();
        let next = Arc::new(Live::new(config, Some(&previous)));
        self.live.store(next);
    }

    pub fn ledger(&self) -> &dyn PaymentStore {
        &*self.ledger
    }

    /// Resolves ledger rows last touched before `cutoff` (unix seconds) against the chain.
    pub async fn reconcile(&self, cutoff: u64) -> Result<Reconciled, LedgerError> {
        ledger::reconcile(&*self.ledger, &self.live().chains, self.reconcile_log_chunk_blocks, cutoff, cutoff).await
    }

    /// At start, everything a previous run left open (the streams it stopped in the middle of settled for what
    /// they sent); then, periodically, what timeouts left open.
    pub async fn reconcile_forever(self: Arc<Self>) {
        let started = unix_now();
        let (mut settling_cutoff, mut cutoff) = (started, started);
        loop {
            self.settle_interrupted_streams().await;
            let chains = self.live().chains.clone();
            match ledger::reconcile(&*self.ledger, &chains, self.reconcile_log_chunk_blocks, settling_cutoff, cutoff)
                .await
            {
                Ok(report) if report != Reconciled::default() => tracing::info!(?report, "ledger reconciled"),
                Ok(_) => {}
                Err(err) => tracing::error!("ledger reconciliation failed: {err}"),
            }
            tokio::time::sleep(self.reconcile_interval).await;
            let now = unix_now();
            settling_cutoff = now.saturating_sub(self.settling_grace.as_secs()).max(started);
            cutoff = now.saturating_sub(RECONCILE_GRACE.as_secs()).max(started);
        }
    }

    /// Serves one request on a public listener. A request that carries a payment runs in a task of its own: a
    /// client that goes away cannot cut a payment's steps in half (a reservation held, a row half written);
    /// the answer is simply dropped. Other requests change nothing, and are served in the connection's task.
    async fn handle_public(self: Arc<Self>, request: Request<Incoming>, client: ClientInfo) -> Response<Body> {
        if self.carrier.payment(request.headers()).is_none() {
            return self.serve(request, client).await;
        }
        match tokio::spawn(async move { self.serve(request, client).await }).await {
            Ok(response) => response,
            Err(err) => {
                tracing::error!("request task failed: {err}");
                GatewayError::Internal.into_response()
            }
        }
    }

    /// The request through its phases, with one context, closed by its metrics and access line.
    async fn serve(self: &Arc<Self>, request: Request<Incoming>, client: ClientInfo) -> Response<Body> {
        let mut ctx = RequestContext::new(&request, client);
        let live = self.live();
        let in_flight = self.metrics.in_flight();
        let response = match self.route(&live, request, &mut ctx) {
            Ok(Next::Answer(response)) => Ok(response),
            Ok(Next::Forward(request, route)) => self.forward(request, &route).await,
            // Boxed: a paid call's stages hold far more state than a free call, which should not carry its size.
            Ok(Next::Pay(request, route, path)) => {
                Box::pin(self.process_paid(&live, request, &route, &path, &mut ctx)).await
            }
            Ok(Next::Shadow(request, route, path)) => {
                Box::pin(self.process_shadow(&live, request, &route, &path, &mut ctx)).await
            }
            Err(err) => Err(err),
        };
        let response = response.unwrap_or_else(GatewayError::into_response);
        drop(in_flight);
        ctx.close(response.status(), &self.metrics);
        response
    }

    /// Match → route: what the gateway answers itself, what it forwards free, what must be paid for, and what
    /// is priced but served free (shadow mode).
    /// Nothing here waits, so the future a free request is served in stays small.
    fn route(&self, live: &Live, request: Request<Incoming>, ctx: &mut RequestContext) -> Result<Next, GatewayError> {
        let client = &ctx.client;
        if !names_host(&request) {
            return Err(GatewayError::MissingHost);
        }
        let canonical_path = routing::canonicalize(request.uri().path())?;
        if let Some(response) = live.paid_route_preflight(&request, &canonical_path) {
            return Ok(Next::Answer(response));
        }
        if let Some(list) = live.catalogue(&request, &canonical_path) {
            return Ok(Next::Answer(list));
        }
        if request.method() == http::Method::GET && canonical_path == discovery::PATH {
            let upto_signer =
                |paid: &PaidRoute, chain_id| live.facilitators.get(&paid.facilitator, chain_id)?.upto_signer(chain_id);
            let document = discovery::document(live.routes.routes(), &live.base_url(&request, client), upto_signer);
            return Ok(Next::Answer(discovery::response(&document, live.public_url.is_none())));
        }
        let route = live.match_route(&request, &canonical_path)?;
        ctx.route = Some(route.pattern_text.clone());
        let request = live.limit_body(request)?;
        match route.payment.as_ref().map(|paid| paid.mode) {
            None => {
                let mut request = request;
                self.carrier.strip(request.headers_mut());
                Ok(Next::Forward(upstream_request(request, &route, &canonical_path, &ctx.client)?, route))
            }
            Some(PaymentMode::Enforce) => Ok(Next::Pay(request, route, canonical_path)),
            Some(PaymentMode::Shadow) => Ok(Next::Shadow(request, route, canonical_path)),
        }
    }

    /// Price → payment gate → verify → record → upstream and settlement, for a route that has a price.
    async fn process_paid(
        self: &Arc<Self>,
        live: &Arc<Live>,
        request: Request<Body>,
        route: &Arc<RouteSpec>,
        canonical_path: &str,
        ctx: &mut RequestContext,
    ) -> Result<Response<Body>, GatewayError> {
        let Some(paid) = &route.payment else { return Err(GatewayError::Internal) };
        let route_name = &*route.pattern_text;
        if self.carrier.payment(request.headers()).is_some() {
            let address = crate::proxy::ClientAddress::of(ctx.client.peer.ip());
            if let Err(retry_after) = self.attempts.take(address, Instant::now()) {
                self.metrics.rejected(route_name, "too_many_payment_attempts");
                return Err(GatewayError::TooManyPaymentAttempts { retry_after });
            }
        }

        // Price: the offers for exactly this request (an `upto` offer names the facilitator that settles it).
        let (request, body, _buffered) = live.buffer_body_for_pricing(request, paid, &self.buffered).await?;
        let priced =
            live.price(paid, request.uri().query(), request.headers(), &body).await.map_err(GatewayError::Price)?;
        let offers = &*priced.offers;
        let resource = live.resource_info(&request, paid, priced.key.as_deref(), &ctx.client);
        let request_headers = request.headers();
        let challenge = |rejection: Option<&Rejection>| {
            self.challenge(route_name, paid.bazaar.as_ref(), request_headers, offers, resource.clone(), rejection)
        };

        // Payment gate: decode, match an offer, verify offline, hold the authorization for this request. Each
        // authorization is served by one request at a time, and is freed when the hold goes unless it may have
        // been charged: every return below that charges nothing frees it.
        let (payment, mut hold) = match self.gate.check(offers, self.carrier.payment(request.headers()), unix_now()) {
            Ok(held) => held,
            Err(GateError::Reserved(payment, mut hold)) => match self.already_paid(&payment, challenge).await {
                Some(answer) => return Ok(answer),
                None => {
                    hold.not_charged();
                    (*payment, hold)
                }
            },
            Err(GateError::InUse) => return Ok(challenge(Some(&Rejection::Replayed))),
            Err(GateError::Challenge(rejection)) => return Ok(challenge(rejection.as_ref())),
            Err(GateError::Malformed(message)) => {
                self.metrics.rejected(route_name, "invalid_payload");
                return Err(GatewayError::MalformedPayment(message));
            }
            Err(GateError::Busy) => return Err(GatewayError::PaymentsBusy),
        };
        if self.answers.get(&payment).is_some_and(|answered| answered.paid_by != payment.key) {
            // A `payment-identifier` already answered, now with another authorization: nothing is charged.
            return Ok(paid::identifier_reused());
        }

        // Verify with the facilitator (on-chain simulation when local), then record: write-ahead of any effect.
        let Some(facilitator) = live.facilitators.get(&paid.facilitator, payment.offer.network.chain_id) else {
            return Err(GatewayError::FacilitatorUnavailable("no facilitator for this network".into()));
        };
        let verifying = Instant::now();
        if let Err(failure) = facilitator.verify(&payment, &resource).await {
            return match failure {
                VerifyFailure::Rejected(rejection) => Ok(challenge(Some(&rejection))),
                VerifyFailure::Unavailable(why) => Err(GatewayError::FacilitatorUnavailable(why)),
            };
        }
        // An `upto` payment settles after its answer: the buyer's payments served at once must fit its balance.
        let commitment = match self.commit_upto(live, &payment).await {
            Ok(commitment) => commitment,
            Err(VerifyFailure::Rejected(rejection)) => return Ok(challenge(Some(&rejection))),
            Err(VerifyFailure::Unavailable(why)) => return Err(GatewayError::FacilitatorUnavailable(why)),
        };
        self.metrics.verified(route_name, verifying.elapsed());
        let id =
            match self.ledger.record_verified(new_payment(&payment, route_name, paid.settle, facilitator.name())).await
            {
                Ok(Ok(id)) => id,
                Ok(Err(spent)) => {
                    hold.spend();
                    return Ok(paid::spent(&self.carrier, &payment, &spent));
                }
                Err(err) => {
                    tracing::error!("{err}");
                    return Err(GatewayError::LedgerUnavailable);
                }
            };
        ctx.payment = Some(Box::new(payment.clone()));
        ctx.ledger_id = Some(id);
        ctx.price_key = priced.key.clone();
        let charging = match &priced.meter {
            None => None,
            Some(meter) => {
                let index = offers.iter().position(|offer| *offer == payment.offer).ok_or(GatewayError::Internal)?;
                let rates = *meter.rates.get(index).ok_or(GatewayError::Internal)?;
                let prompt_bytes = meter.prompt_bound;
                let (ceiling, decimals) = (payment.offer.amount, payment.offer.asset.decimals);
                let charging = metered::Charging { rates, ceiling, prompt_bytes, decimals, _commitment: commitment };
                Some((charging, meter))
            }
        };

        // Upstream and settlement, in the route's order.
        let mut request = request;
        self.carrier.strip(request.headers_mut());
        if let Some((_, meter)) = &charging {
            request = metering::rewrite_body(request, &body, meter);
        }
        let request = upstream_request(request, route, canonical_path, &ctx.client)?;
        let call = PaidCall { facilitator, payment, hold, id, resource, ctx, max_held: live.settle_after_max_bytes };
        match (charging, paid.settle) {
            (Some((charging, _)), _) => self.meter_then_settle(live, request, route, call, charging).await,
            (None, SettleMode::Before) => self.settle_then_stream(request, route, call).await,
            (None, SettleMode::After) => self.deliver_then_settle(request, route, call).await,
        }
    }

    async fn forward(&self, request: Request<Body>, route: &RouteSpec) -> Result<Response<Body>, GatewayError> {
        let started = Instant::now();
        let answer = upstream::send(request, route).await;
        self.metrics.upstream(started.elapsed());
        answer
    }

    /// A 402 challenge for `offers`, rendered for the client that asked, and counted.
    fn challenge(
        &self,
        route: &str,
        bazaar: Option<&Bazaar>,
        request_headers: &http::HeaderMap,
        offers: &[Offer],
        resource: ResourceInfo,
        rejection: Option<&Rejection>,
    ) -> Response<Body> {
        self.metrics.challenge(route);
        if let Some(rejection) = rejection {
            self.metrics.rejected(route, rejection.reason());
        }
        let mut response = self.carrier.challenge(&Challenge { offers, resource, rejection, bazaar }, request_headers);
        // The buyer must approve Permit2 once before an `upto` payment can settle, as the reference answers.
        if rejection.is_some_and(|r| r.reason() == Rejection::Permit2AllowanceRequired.reason()) {
            *response.status_mut() = http::StatusCode::PRECONDITION_FAILED;
        }
        response
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
                    let shown = facilitator.shown_url();
                    warnings.push(format!("facilitator {shown} cannot be asked what it supports: {why}"));
                    continue;
                }
            };
            let serves = |scheme: &str, network: &str| {
                kinds.iter().any(|k| k["x402Version"] == 2 && k["scheme"] == scheme && k["network"] == network)
            };
            for route in live.routes.routes() {
                let Some(paid) = route.payment.as_ref() else { continue };
                let names_it = |set: &RemoteSet| set.facilitators.iter().any(|f| f.url == url);
                if !matches!(&paid.facilitator, FacilitatorChoice::Remote(set) if names_it(set)) {
                    continue;
                }
                let offers = paid.pricing.all_offers();
                let mut networks: Vec<&str> =
                    offers.iter().flat_map(|(_, o)| o.iter()).map(|o| o.network.caip2.as_str()).collect();
                networks.dedup();
                let scheme = match paid.pricing {
                    Pricing::PerToken(_) => "upto",
                    _ => SCHEME_EXACT,
                };
                for network in networks.into_iter().filter(|n| !serves(scheme, n)) {
                    warnings.push(format!(
                        "facilitator {} does not list {scheme} payments on {network} (route {})",
                        facilitator.shown_url(),
                        route.pattern_text
                    ));
                }
            }
        }
        warnings
    }

    async fn answer_admin(&self, request: Request<Incoming>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&http::Method::GET, "/healthz") => admin::healthz(),
            (&http::Method::GET, "/readyz") => admin::readyz(self.live().facilitators.readiness().await),
            (&http::Method::GET, "/metrics") => {
                let facilitators = self.live().facilitators.states();
                admin::metrics(self.metrics.render(self.gate.reserved(), &facilitators))
            }
            _ => admin::not_found(),
        }
    }
}

/// The listeners serve the gateway: public requests through the pipeline, admin requests, and the
/// background work (reconciliation, the facilitators' start-up check) once they accept.
impl Handler for Gateway {
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        client: ClientInfo,
    ) -> impl std::future::Future<Output = Response<Body>> + Send {
        self.handle_public(request, client)
    }

    async fn handle_admin(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        self.answer_admin(request).await
    }

    fn started(self: Arc<Self>) {
        tokio::spawn(self.clone().reconcile_forever());
        tokio::spawn(async move {
            for warning in self.facilitator_warnings().await {
                tracing::warn!("{warning}");
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Listen(#[from] crate::proxy::server::StartError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// The gateway on `config` (its ledger opened) and its bound listeners, ready to run.
pub async fn bind(config: Config) -> Result<Server<Gateway>, StartError> {
    let server = config.server.clone();
    let gateway = Arc::new(Gateway::new(config).await?);
    Ok(Server::bind(&server, gateway).await?)
}

fn new_payment(payment: &Payment, route: &str, settle: SettleMode, facilitator: String) -> NewPayment {
    NewPayment {
        route: route.to_string(),
        payer: payment.authorization.payer(),
        payee: payment.authorization.payee(),
        network: payment.offer.network.caip2.clone(),
        chain_id: payment.offer.network.chain_id,
        asset: payment.offer.asset.address,
        amount: payment.authorization.authorized(),
        nonce: payment.authorization.nonce(),
        valid_before: payment.authorization.expires_at(),
        scheme: payment.offer.scheme.name(),
        settle_mode: match settle {
            SettleMode::After => "after",
            SettleMode::Before => "before",
        },
        facilitator,
    }
}

/// The reservation key of a ledger row: Permit2's nonces (`upto`) are the payer's across tokens.
fn nonce_key(row: &ledger::Row) -> NonceKey {
    let asset = if row.scheme == "upto" { x402_proto::upto_evm::PERMIT2 } else { row.asset };
    NonceKey { chain_id: row.chain_id, asset, from: row.payer, nonce: row.nonce }
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
