//! One request's context, in the manner of Pingora's `CTX`: what the phases learn about the request, carried
//! from the first phase to the closing one, which writes its metrics and its access line once.

use crate::gate::Payment;
use crate::logging::{self, AccessLine};
use crate::metrics::Metrics;
use crate::proxy::upstream::ClientInfo;
use http::{Method, Request, StatusCode, Uri};
use std::sync::Arc;
use std::time::Instant;

pub(super) struct RequestContext {
    pub started: Instant,
    pub method: Method,
    /// A shared copy (no allocation): the request itself moves on through the phases.
    pub uri: Uri,
    pub client: ClientInfo,
    /// The route's pattern, once matched.
    pub route: Option<Arc<str>>,
    /// The request value that set the price (the model, for an LLM route).
    pub price_key: Option<String>,
    /// Boxed: a free request's future carries this context, and a payment is large.
    pub payment: Option<Box<Payment>>,
    pub ledger_id: Option<i64>,
    pub transaction: Option<String>,
}

impl RequestContext {
    pub fn new<B>(request: &Request<B>, client: ClientInfo) -> RequestContext {
        RequestContext {
            started: Instant::now(),
            method: request.method().clone(),
            uri: request.uri().clone(),
            client,
            route: None,
            price_key: None,
            payment: None,
            ledger_id: None,
            transaction: None,
        }
    }

    /// The closing phase: the request's metrics and access line, from what the phases recorded.
    pub fn close(&self, status: StatusCode, metrics: &Metrics) {
        metrics.request(self.route.as_ref(), status.as_u16());
        let payment = self.payment.as_ref();
        logging::access(&AccessLine {
            method: self.method.as_str(),
            path: self.uri.path(),
            route: self.route.as_deref().unwrap_or("-"),
            status: status.as_u16(),
            latency: self.started.elapsed(),
            client: self.client.peer.ip(),
            payer: payment.map(|p| p.authorization.payer().to_string()),
            amount: payment.map(|p| p.authorization.authorized().to_string()),
            network: payment.map(|p| p.offer.network.caip2.as_str()),
            ledger_id: self.ledger_id,
            transaction: self.transaction.as_deref(),
        });
    }
}
