//! The stages of a paid call after verification: upstream and settlement in the route's order, each step
//! recorded in the ledger before it takes effect, and the answers to retries of a spent authorization.

use super::context::RequestContext;
use super::{read_to_limit, Gateway, ReadError};
use crate::answers::StoredAnswer;
use crate::body::{full, json_response, Body};
use crate::carrier::Carrier;
use crate::config::RouteSpec;
use crate::error::GatewayError;
use crate::gate::{Hold, Payment};
use crate::ledger::{PaymentStore, Row, State};
use crate::metering::SETTLEMENT_OVERRIDES;
use crate::settlement::{BeforeBroadcast, Facilitator, SettleFailure, Settled};
use crate::usage::{OnEnd, Tapped, UsageTap};
use crate::x402::wire::ResourceInfo;
use crate::x402::Rejection;
use alloy::primitives::U256;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Instant;

/// A verified, reserved and recorded payment on its way through the upstream and settlement stages.
pub(super) struct PaidCall<'g, 'l> {
    pub facilitator: &'g dyn Facilitator,
    pub payment: Payment,
    pub hold: Hold,
    /// Its ledger row.
    pub id: i64,
    pub resource: ResourceInfo,
    pub ctx: &'l mut RequestContext,
    /// Largest answer held back under `settle = "after"`.
    pub max_held: usize,
}

impl Gateway {
    /// `settle = "before"`: the payment settles first, then the answer streams through with its receipt.
    pub(super) async fn settle_then_stream(
        &self,
        request: Request<Body>,
        route: &RouteSpec,
        mut call: PaidCall<'_, '_>,
    ) -> Result<Response<Body>, GatewayError> {
        let price = call.payment.authorization.authorized();
        self.write_ahead(self.ledger.settling(call.id, None).await)?;
        let settled = match self.settle(route, &mut call, price).await {
            Ok(settled) => settled,
            Err(failure) => return Ok(self.settle_failed(&call, &failure).await),
        };
        self.record(self.ledger.settled(call.id, settled.transaction.clone()).await);
        call.ctx.transaction = Some(settled.transaction.clone());
        let (mut response, delivered) = match self.forward(request, route).await {
            Ok(response) if !failed(response.status()) => (response, true),
            Ok(response) => (response, false),
            Err(err) => (err.into_response(), false),
        };
        // An `exact` price is the price: an upstream's own charge is for the gateway's eyes, and ignored.
        response.headers_mut().remove(SETTLEMENT_OVERRIDES);
        if !delivered {
            let reason = format!("the upstream answered {} after the payment settled", response.status().as_u16());
            tracing::error!(transaction = %settled.transaction, payer = %call.payment.authorization.payer(), "{reason}: refund needed");
            self.record(self.ledger.refund_needed(call.id, reason).await);
        }
        self.carrier.attach_receipt(&mut response, &call.payment, &settled);
        let served = delivered.then(|| (self.ledger.clone(), call.id));
        Ok(record_usage(response, route, call.ctx, served))
    }

    /// `settle = "after"`: the answer is held until the payment settles; a failed answer is not charged.
    pub(super) async fn deliver_then_settle(
        &self,
        request: Request<Body>,
        route: &RouteSpec,
        mut call: PaidCall<'_, '_>,
    ) -> Result<Response<Body>, GatewayError> {
        let price = call.payment.authorization.authorized();
        let mut response = match self.forward(request, route).await {
            Ok(response) => response,
            Err(err) => {
                self.release(&call, None).await;
                return Err(err);
            }
        };
        response.headers_mut().remove(SETTLEMENT_OVERRIDES);
        let status = response.status();
        if failed(status) {
            self.release(&call, Some(status)).await;
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let body = self.hold_answer(route, &call, status, body).await?;
        if let Err(err) = self.write_ahead(self.ledger.settling(call.id, Some(status.as_u16())).await) {
            self.record(self.ledger.released(call.id, Some(status.as_u16())).await);
            return Err(err);
        }
        let settled = match self.settle(route, &mut call, price).await {
            Ok(settled) => settled,
            Err(failure) => {
                if !failure.nothing_moved {
                    self.keep_withheld(&call, parts, body);
                }
                return Ok(self.settle_failed(&call, &failure).await);
            }
        };
        Ok(self.deliver_settled(route, call, parts, body, &settled).await)
    }

    /// The whole answer of a call that settles after it, read within the upstream's timeout (not just its head: a
    /// payment is open meanwhile); a failure to read it releases the call, charging nothing.
    pub(super) async fn hold_answer(
        &self,
        route: &RouteSpec,
        call: &PaidCall<'_, '_>,
        status: StatusCode,
        body: Body,
    ) -> Result<bytes::Bytes, GatewayError> {
        match tokio::time::timeout(route.upstream.timeout, read_to_limit(body, call.max_held)).await {
            Ok(Ok(body)) => Ok(body),
            outcome => {
                self.release(call, Some(status)).await;
                Err(match outcome {
                    Err(_) => GatewayError::UpstreamTimeout,
                    Ok(Err(ReadError::TooLarge)) => GatewayError::AnswerTooLarge,
                    Ok(_) => GatewayError::UpstreamUnavailable,
                })
            }
        }
    }

    /// A held answer whose settlement may still land: kept for the buyer's retry once reconciliation knows.
    pub(super) fn keep_withheld(&self, call: &PaidCall<'_, '_>, parts: http::response::Parts, body: bytes::Bytes) {
        let withheld = StoredAnswer {
            status: parts.status,
            headers: parts.headers,
            body,
            paid_by: call.payment.key,
            row: call.id,
            settled: false,
        };
        self.answers.keep(&call.payment, withheld);
    }

    /// A held answer, settled: it goes out with its receipt, and is kept for retries.
    pub(super) async fn deliver_settled(
        &self,
        route: &RouteSpec,
        call: PaidCall<'_, '_>,
        parts: http::response::Parts,
        body: bytes::Bytes,
        settled: &Settled,
    ) -> Response<Body> {
        let mut response = Response::from_parts(parts, full(body.clone()));
        self.carrier.attach_receipt(&mut response, &call.payment, settled);
        let kept = StoredAnswer {
            status: response.status(),
            headers: response.headers().clone(),
            body,
            paid_by: call.payment.key,
            row: call.id,
            settled: true,
        };
        // Kept before the ledger says settled: a concurrent retry that finds the row settled finds the answer too.
        self.answers.keep(&call.payment, kept);
        self.record(self.ledger.settled(call.id, settled.transaction.clone()).await);
        call.ctx.transaction = Some(settled.transaction.clone());
        record_usage(response, route, call.ctx, Some((self.ledger.clone(), call.id)))
    }

    /// Settles the payment. From here on it may move, so its authorization stays reserved unless the
    /// settlement certainly failed before any broadcast.
    pub(super) async fn settle(
        &self,
        route: &RouteSpec,
        call: &mut PaidCall<'_, '_>,
        amount: U256,
    ) -> Result<Settled, SettleFailure> {
        call.hold.spend();
        let started = Instant::now();
        let record_hash = record_hash_before(self.ledger.clone(), call.id);
        let outcome = call.facilitator.settle(&call.payment, &call.resource, amount, Some(record_hash)).await;
        if outcome.as_ref().is_err_and(|failure| failure.nothing_moved) {
            call.hold.not_charged();
        }
        let route = &*route.pattern_text;
        match &outcome {
            Ok(_) => {
                self.metrics.settled(route, "success", started.elapsed());
                let offer = &call.payment.offer;
                let amount = u64::try_from(amount).unwrap_or(u64::MAX);
                self.metrics.revenue(route, &offer.network.caip2, &offer.asset.address.to_string(), amount);
            }
            Err(failure) => self.metrics.settled(route, &failure.reason, started.elapsed()),
        }
        outcome
    }

    /// A settlement failed: 402 with the failure, the answer withheld. A certain failure frees the
    /// authorization; an uncertain one (`settlement_pending`) keeps it, and reconciliation finishes the row.
    pub(super) async fn settle_failed(&self, call: &PaidCall<'_, '_>, failure: &SettleFailure) -> Response<Body> {
        if failure.nothing_moved {
            // The authorization is freed when the request's hold goes, after this row: a retry must find the
            // row failed, not spent.
            self.record(self.ledger.failed(call.id, failure.reason.clone(), failure.transaction.clone()).await);
        } else if let Some(transaction) = &failure.transaction {
            self.record(self.ledger.pending(call.id, transaction.clone()).await);
        }
        tracing::warn!(
            reason = %failure.reason,
            message = %failure.message,
            transaction = failure.transaction.as_deref(),
            payer = %call.payment.authorization.payer(),
            "settlement failed; the answer is withheld",
        );
        self.carrier.settle_failed(&call.payment, failure)
    }

    /// Nothing was charged (the answer failed): the row is released, and the buyer may use the authorization
    /// again once the request's hold goes.
    pub(super) async fn release(&self, call: &PaidCall<'_, '_>, status: Option<StatusCode>) {
        self.record(self.ledger.released(call.id, status.map(|s| s.as_u16())).await);
    }

    /// A retry of an authorization that is already reserved, once its original request is over (the caller
    /// serves it): the original answer if it is kept, else what the ledger knows (409 once it is spent, a
    /// pending 402 while it settles). `None` when the ledger says nothing was charged (`failed`, `released`):
    /// the payment goes on as a new one.
    pub(super) async fn already_paid(
        &self,
        payment: &Payment,
        challenge: impl Fn(Option<&Rejection>) -> Response<Body>,
    ) -> Option<Response<Body>> {
        let auth = &payment.authorization;
        let (chain_id, asset) = (payment.offer.network.chain_id, payment.offer.asset.address);
        let found = self.ledger.find(chain_id, asset, auth.payer(), auth.nonce()).await;
        // Read after the ledger: an answer is kept before its row says settled, so a settled row's answer shows.
        let answer = self.answers.get(payment);
        match &answer {
            Some(answer) if answer.paid_by != payment.key => return Some(identifier_reused()),
            Some(answer) if answer.settled => {
                self.record(self.ledger.served(answer.row).await);
                return Some(replay(answer));
            }
            _ => {}
        }
        let row = match found {
            Ok(Some(row)) if row.state.never_charged() => return None,
            Ok(Some(row)) if row.state != State::Verified => row,
            // Recorded, yet its request ended before any next step (or the ledger cannot say): refused as a
            // duplicate, and reconciliation decides the row.
            _ => return Some(challenge(Some(&Rejection::Replayed))),
        };
        Some(match (answer, row.state.charged(), row.transaction.clone()) {
            // Withheld while pending, settled since: the buyer gets what it paid for, and the row says so.
            (Some(withheld), true, Some(transaction)) => {
                let mut response = replay(&withheld);
                self.carrier.attach_receipt(
                    &mut response,
                    payment,
                    &Settled { transaction, amount: row.charged.filter(|_| row.scheme == "upto") },
                );
                self.record(self.ledger.served(row.id).await);
                response
            }
            _ => spent(&self.carrier, payment, &row),
        })
    }

    /// A ledger write that must succeed before the next step may take effect.
    pub(super) fn write_ahead(&self, written: Result<(), crate::ledger::LedgerError>) -> Result<(), GatewayError> {
        written.map_err(|err| {
            tracing::error!("{err}");
            GatewayError::LedgerUnavailable
        })
    }

    /// A ledger write recording what already happened: a failure is logged (reconciliation will redo it).
    pub(super) fn record(&self, written: Result<(), crate::ledger::LedgerError>) {
        if let Err(err) = written {
            tracing::error!("could not record a payment step: {err}");
        }
    }
}

/// Records a settlement transaction's hash in row `id` before it is broadcast.
pub(super) fn record_hash_before(ledger: Arc<dyn PaymentStore>, id: i64) -> BeforeBroadcast {
    Box::new(move |hash| {
        let ledger = ledger.clone();
        Box::pin(async move { ledger.pending(id, hash.to_string()).await.map_err(|e| e.to_string()) })
    })
}

pub(super) fn failed(status: StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

/// The original paid answer, again: a retry is never charged twice.
fn replay(answer: &StoredAnswer) -> Response<Body> {
    let mut response = Response::new(full(answer.body.clone()));
    *response.status_mut() = answer.status;
    *response.headers_mut() = answer.headers.clone();
    response.headers_mut().insert("x402-replayed", http::HeaderValue::from_static("true"));
    response
}

pub(super) fn identifier_reused() -> Response<Body> {
    json_response(
        StatusCode::CONFLICT,
        &serde_json::json!({
            "error": "payment_identifier_reused",
            "message": "this payment-identifier already paid for an answer, with another authorization",
        }),
    )
}

/// The ledger says this authorization is spent (or settling) and its answer is not kept.
pub(super) fn spent(carrier: &dyn Carrier, payment: &Payment, row: &Row) -> Response<Body> {
    if row.state == State::Settling {
        let pending = SettleFailure {
            reason: "settlement_pending".into(),
            message: "this payment's settlement is still being confirmed".into(),
            transaction: row.transaction.clone(),
            nothing_moved: false,
        };
        return carrier.settle_failed(payment, &pending);
    }
    json_response(
        StatusCode::CONFLICT,
        &serde_json::json!({
            "error": "payment_already_used",
            "message": "this authorization already paid for an answer, which is no longer kept; a new request needs a new payment",
            "transaction": row.transaction,
            "state": row.state.as_str(),
        }),
    )
}

/// Logs the LLM token usage of a paid answer with its payment once the answer has gone out, and marks the
/// ledger row served when it went out whole.
pub(super) fn record_usage(
    response: Response<Body>,
    route: &RouteSpec,
    ctx: &RequestContext,
    served: Option<(Arc<dyn PaymentStore>, i64)>,
) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let route = route.pattern_text.clone();
    let payer = ctx.payment.as_ref().map(|p| p.authorization.payer().to_string());
    let amount = ctx.payment.as_ref().map(|p| p.authorization.authorized().to_string());
    let (transaction, model) = (ctx.transaction.clone(), ctx.price_key.clone());
    let on_end: OnEnd = Box::new(move |Tapped { usage, complete, .. }| {
        if let (true, Some((ledger, id))) = (complete, served) {
            tokio::spawn(async move {
                if let Err(err) = ledger.served(id).await {
                    tracing::error!("could not record a served answer: {err}");
                }
            });
        }
        if let Some(usage) = usage {
            tracing::info!(
                target: "usage",
                route = &*route,
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
