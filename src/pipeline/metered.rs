//! The stages of an `upto` call after verification: the answer is served first, then the payment settles what
//! it cost, never more than the ceiling the buyer signed. A JSON answer is held until it settles, with its
//! receipt in the head; a stream goes out as it comes, and its receipt follows in the trailers.

use super::context::RequestContext;
use super::interrupted::{settle_ticket, Progress};
use super::paid::{failed, PaidCall};

use super::{Gateway, Live};
use crate::answers::StoredAnswer;
use crate::body::{full, Body, BoxError};
use crate::carrier::Carrier;
use crate::chain;
use crate::config::RouteSpec;
use crate::error::GatewayError;
use crate::gate::Payment;
use crate::metering::{self, ChargeBasis, Measured, ModelRates, SETTLEMENT_OVERRIDES};
use crate::replay::unix_now;
use crate::respond;
use crate::settlement::Settled;
use crate::settlement::VerifyFailure;
use crate::usage::{self, Tapped, UsageTap};
use crate::x402::Rejection;
use alloy::primitives::{Address, U256};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use x402_proto::Authorization;

/// Frames of a stream on their way to the buyer, ahead of what it has read.
const STREAM_BUFFER_FRAMES: usize = 8;
/// A stream is cut this long before its permit lapses, and charged what it delivered: time to settle.
const SETTLE_RESERVE: Duration = Duration::from_secs(30);

/// How one `upto` payment is charged.
pub(super) struct Charging {
    /// The model's rates in the paid offer's asset.
    pub rates: ModelRates,
    /// What the buyer signed for.
    pub ceiling: U256,
    /// The request body's size: the prompt bound, and the base of a prompt estimate.
    pub prompt_bytes: u64,
    pub decimals: u8,
    /// Its share of its buyer's balance, held (for its drop) while it is being served.
    pub _commitment: Option<Commitment>,
}

/// The ceilings of the `upto` payments being served, by chain, token and payer. Each settles only after its
/// answer, so a buyer's payments served at once must fit its balance together, not each on its own.
#[derive(Default)]
pub(super) struct Outstanding(Mutex<HashMap<(u64, Address, Address), U256>>);

/// One payment's ceiling in [`Outstanding`], until it is dropped.
pub(super) struct Commitment {
    outstanding: Arc<Outstanding>,
    key: (u64, Address, Address),
    ceiling: U256,
}

impl Drop for Commitment {
    fn drop(&mut self) {
        let Ok(mut by_payer) = self.outstanding.0.lock() else { return };
        if let Some(sum) = by_payer.get_mut(&self.key) {
            *sum = sum.saturating_sub(self.ceiling);
            if sum.is_zero() {
                by_payer.remove(&self.key);
            }
        }
    }
}

impl Gateway {
    /// Counts a verified `upto` payment against its buyer's balance while it is served: when others of the same
    /// buyer are being served, the balance must cover them all (one read of it; none for a lone payment, which
    /// verification checked already). `None` for other schemes.
    pub(super) async fn commit_upto(
        &self,
        live: &Live,
        payment: &Payment,
    ) -> Result<Option<Commitment>, VerifyFailure> {
        let Authorization::Upto(auth) = &payment.authorization else { return Ok(None) };
        let key = (payment.offer.network.chain_id, auth.token, auth.from);
        let before = match self.outstanding.0.lock() {
            Ok(mut by_payer) => {
                let sum = by_payer.entry(key).or_default();
                let before = *sum;
                *sum = sum.saturating_add(auth.ceiling);
                before
            }
            Err(_) => return Err(VerifyFailure::Unavailable("the payments being served cannot be counted".into())),
        };
        let commitment = Commitment { outstanding: self.outstanding.clone(), key, ceiling: auth.ceiling };
        // Without a node of its own to ask (a remote facilitator's network), the facilitator's check stands alone.
        let (true, Some(provider)) = (!before.is_zero(), live.chains.get(&key.0)) else { return Ok(Some(commitment)) };
        match chain::balance_of(provider, auth.token, auth.from).await {
            Ok(balance) if balance >= before.saturating_add(auth.ceiling) => Ok(Some(commitment)),
            Ok(_) => Err(VerifyFailure::Rejected(Rejection::Permit2InsufficientBalance)),
            Err(_) => Err(VerifyFailure::Unavailable("the payer's balance cannot be read".into())),
        }
    }

    /// Upstream, then the charge its answer comes to, then settlement of that charge.
    pub(super) async fn meter_then_settle(
        self: &Arc<Self>,
        live: &Arc<Live>,
        request: http::Request<Body>,
        route: &Arc<RouteSpec>,
        call: PaidCall<'_, '_>,
        charging: Charging,
    ) -> Result<Response<Body>, GatewayError> {
        let response = match self.forward(request, route).await {
            Ok(response) => response,
            Err(err) => {
                self.release(&call, None).await;
                return Err(err);
            }
        };
        let status = response.status();
        let (mut parts, body) = response.into_parts();
        // Removed whatever the answer: it is for the gateway alone.
        let overridden = self.settlement_override(&mut parts.headers, &charging, &route.pattern_text);
        if failed(status) {
            // An upstream error is charged nothing, and sends no transaction.
            self.release(&call, Some(status)).await;
            return Ok(Response::from_parts(parts, body));
        }
        let streams = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"));
        if streams {
            return Ok(self.stream_then_settle(live, route, call, charging, overridden, parts, body));
        }
        let mut call = call;
        let body = self.hold_answer(route, &call, status, body).await?;
        let tapped = Tapped {
            usage: usage::of_json_answer(&body),
            complete: true,
            content_bytes: u64::try_from(body.len()).unwrap_or(u64::MAX),
        };
        let settled = match self.charge(route, &mut call, &charging, overridden, tapped, status, false).await {
            Ok(settled) => settled,
            Err(Refused::Answer(response)) => return Ok(response),
            Err(Refused::Withheld(response)) => {
                self.keep_withheld(&call, parts, body);
                return Ok(response);
            }
            Err(Refused::Error(err)) => return Err(err),
            Err(Refused::Unsettled(_)) => return Err(GatewayError::Internal),
        };
        if settled.transaction.is_empty() {
            // Nothing was owed: the receipt says so, and there is nothing to keep for a retry.
            let mut response = Response::from_parts(parts, full(body));
            self.carrier.attach_receipt(&mut response, &call.payment, &settled);
            return Ok(response);
        }
        Ok(self.deliver_settled(route, call, parts, body, &settled).await)
    }

    /// The stream goes out as it comes, from a task of its own: a buyer that goes away half-way is charged for
    /// what it was sent, and the settlement happens whatever the connection does.
    #[allow(clippy::too_many_arguments)]
    fn stream_then_settle(
        self: &Arc<Self>,
        live: &Arc<Live>,
        route: &Arc<RouteSpec>,
        call: PaidCall<'_, '_>,
        charging: Charging,
        overridden: Option<U256>,
        mut parts: http::response::Parts,
        body: Body,
    ) -> Response<Body> {
        let (frames, receiver) = mpsc::channel(STREAM_BUFFER_FRAMES);
        parts.headers.remove(header::CONTENT_LENGTH);
        // HTTP/1.1 sends only the trailers the head announces (and only to a client that sent `TE: trailers`).
        parts.headers.insert(header::TRAILER, self.carrier.receipt_trailer_name(&call.payment));
        respond::keep_private(&mut parts.headers);
        let head = parts.headers.clone();
        let status = parts.status;
        let PaidCall { payment, hold, id, resource, ctx, max_held, .. } = call;
        let detached = ctx.detached();
        let (gateway, live, route) = (self.clone(), live.clone(), route.clone());
        let facilitator_choice = route.payment.as_ref().map(|paid| paid.facilitator.clone());
        tokio::spawn(async move {
            let chain_id = payment.offer.network.chain_id;
            let Some(facilitator) = facilitator_choice.as_ref().and_then(|c| live.facilitators.get(c, chain_id)) else {
                // The call was verified through this configuration's facilitator, which it still holds.
                tracing::error!(payer = %payment.authorization.payer(), "no facilitator to settle a streamed upto payment");
                gateway.record(gateway.ledger.released(id, Some(status.as_u16())).await);
                return;
            };
            let mut ctx = detached;
            // Until it has settled, reconciliation leaves its row to this task.
            let _serving = gateway.streams.enter(id);
            let call = PaidCall { facilitator, payment, hold, id, resource, ctx: &mut ctx, max_held };
            let stream = Stream { frames, head, status };
            gateway.relay_and_settle(&route, call, charging, overridden, body, stream).await;
        });
        Response::from_parts(parts, ChannelBody { receiver }.boxed_unsync())
    }

    async fn relay_and_settle(
        &self,
        route: &RouteSpec,
        mut call: PaidCall<'_, '_>,
        charging: Charging,
        overridden: Option<U256>,
        body: Body,
        stream: Stream,
    ) {
        let (seen, tapped) = oneshot::channel();
        let content_type = stream.head.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let mut tap = UsageTap::new(
            body,
            content_type,
            Box::new(move |t| {
                let _ = seen.send(t);
            }),
        );
        let mut kept = Some(BytesMut::new());
        let mut whole = true;
        let mut progress = Progress::new(settle_ticket(&call.payment, &call.resource));
        // However the upstream and the buyer pace it, the stream ends in time to settle before the permit lapses.
        let lapses_in = Duration::from_secs(call.payment.authorization.settle_by().saturating_sub(unix_now()));
        let stop = tokio::time::Instant::now() + lapses_in.saturating_sub(SETTLE_RESERVE);
        loop {
            let frame_due = (tokio::time::Instant::now() + route.upstream.timeout).min(stop);
            let next = loop {
                let progress_due = progress.due();
                tokio::select! {
                    next = tokio::time::timeout_at(frame_due, tap.frame()) => break next,
                    // A stalled upstream does not keep what went out before it from the row.
                    () = tokio::time::sleep_until(progress_due.unwrap_or(frame_due)), if progress_due.is_some() => {
                        self.record_progress(call.id, &mut progress).await;
                    }
                }
            };
            let frame = match next {
                Ok(Some(Ok(frame))) => frame,
                Ok(None) => break,
                // A broken or stalled upstream, or the permit's time running out, ends the stream here; what was
                // sent is charged.
                _ => {
                    whole = false;
                    break;
                }
            };
            // The receipt is the stream's trailer: an upstream's own trailers do not go out.
            let Some(data) = frame.data_ref() else { continue };
            kept = kept.filter(|buffer| buffer.len() + data.len() <= call.max_held);
            if let Some(buffer) = &mut kept {
                buffer.extend_from_slice(data);
            }
            // A buyer that stops reading is cut at the same point.
            if !matches!(tokio::time::timeout_at(stop, stream.frames.send(Ok(frame))).await, Ok(Ok(()))) {
                whole = false;
                break;
            }
            // Should the gateway stop before the stream ends, what went out is charged after the restart.
            progress.sent(charge_of(&charging, overridden, &tap.so_far()).0);
            if progress.due().is_some_and(|due| due <= tokio::time::Instant::now()) {
                self.record_progress(call.id, &mut progress).await;
            }
        }
        drop(tap);
        let tapped = tapped.await.unwrap_or_default();
        let settled = match self.charge(route, &mut call, &charging, overridden, tapped, stream.status, true).await {
            Ok(settled) => settled,
            Err(refused) => {
                // The answer is out. Its authorization stays spent whatever the failure said, so that a buyer who
                // emptied its balance or revoked its allowance mid-stream cannot use it again, and its row stays
                // `settling` for reconciliation to decide by the chain.
                call.hold.spend();
                let why = match refused {
                    Refused::Error(err) => err.to_string(),
                    Refused::Unsettled(reason) => reason,
                    Refused::Answer(response) | Refused::Withheld(response) => response.status().to_string(),
                };
                tracing::error!(payer = %call.payment.authorization.payer(), "a streamed upto answer was not paid for: {why}");
                return;
            }
        };
        // Settled: its ceiling no longer counts against the buyer's balance, before the buyer hears so.
        drop(charging);
        let trailers = self.carrier.receipt_trailers(&call.payment, &settled);
        if settled.transaction.is_empty() {
            let _ = stream.frames.send(Ok(Frame::trailers(trailers))).await;
            return;
        }
        if let (Some(body), true) = (kept, whole) {
            let mut headers = stream.head.clone();
            headers.extend(trailers.clone());
            headers.remove(header::TRAILER);
            let kept = StoredAnswer {
                status: stream.status,
                headers,
                body: body.freeze(),
                paid_by: call.payment.key,
                row: call.id,
                settled: true,
            };
            self.answers.keep(&call.payment, kept);
        }
        self.record(self.ledger.settled(call.id, settled.transaction.clone()).await);
        let _ = stream.frames.send(Ok(Frame::trailers(trailers))).await;
    }

    /// The charge the answer comes to, recorded, then settled (an answer that cost nothing settles nothing).
    /// `delivered`: the answer has gone out already (a stream), and cannot be withheld.
    #[allow(clippy::too_many_arguments)]
    async fn charge(
        &self,
        route: &RouteSpec,
        call: &mut PaidCall<'_, '_>,
        charging: &Charging,
        overridden: Option<U256>,
        tapped: Tapped,
        status: StatusCode,
        delivered: bool,
    ) -> Result<Settled, Refused> {
        let (charge, basis) = charge_of(charging, overridden, &tapped);
        let usage = tapped.usage.map(|u| (u.prompt_tokens, u.completion_tokens));
        if let Err(err) = self.write_ahead(self.ledger.metered(call.id, charge, usage).await) {
            self.record(self.ledger.released(call.id, Some(status.as_u16())).await);
            return Err(Refused::Error(err));
        }
        let share = ratio(charge, charging.ceiling);
        self.metrics.metered(&route.pattern_text, basis.as_str(), share, usage);
        tracing::info!(
            target: "usage",
            route = &*route.pattern_text,
            payer = %call.payment.authorization.payer(),
            ceiling = %charging.ceiling,
            charged = %charge,
            basis = basis.as_str(),
            prompt_tokens = usage.map(|u| u.0),
            completion_tokens = usage.map(|u| u.1),
            complete = tapped.complete,
        );
        if charge.is_zero() {
            self.record(self.ledger.released(call.id, Some(status.as_u16())).await);
            return Ok(Settled { transaction: String::new(), amount: Some(U256::ZERO) });
        }
        if let Err(err) = self.write_ahead(self.ledger.settling(call.id, Some(status.as_u16())).await) {
            self.record(self.ledger.released(call.id, Some(status.as_u16())).await);
            return Err(Refused::Error(err));
        }
        if delivered {
            // Out already, whatever the settlement does: this authorization can never pay for another answer.
            self.record(self.ledger.served(call.id).await);
        }
        match self.settle(route, call, charge).await {
            Ok(settled) => {
                // A remote facilitator reports what it settled: anything but the charge asked is the operator's to see.
                if settled.amount.is_some_and(|reported| reported != charge) {
                    tracing::warn!(transaction = %settled.transaction, %charge, reported = ?settled.amount, "the facilitator reports another amount settled than the charge");
                }
                Ok(Settled { amount: Some(charge), ..settled })
            }
            // An answer already out is not taken back: its row stays `settling` (with the transaction, if one
            // was sent), so that its authorization is never used again unpaid and reconciliation decides it.
            Err(failure) if delivered => {
                if let Some(transaction) = &failure.transaction {
                    self.record(self.ledger.pending(call.id, transaction.clone()).await);
                }
                Err(Refused::Unsettled(failure.reason))
            }
            Err(failure) => {
                let response = self.settle_failed(call, &failure).await;
                Err(if failure.nothing_moved { Refused::Answer(response) } else { Refused::Withheld(response) })
            }
        }
    }

    /// The upstream's own charge (`Settlement-Overrides`), capped at the ceiling; taken out of the answer.
    fn settlement_override(&self, headers: &mut HeaderMap, charging: &Charging, route: &str) -> Option<U256> {
        let value = headers.remove(SETTLEMENT_OVERRIDES)?;
        match metering::override_amount(value.as_bytes(), charging.ceiling, charging.decimals) {
            Ok(amount) if amount > charging.ceiling => {
                tracing::warn!(route, %amount, ceiling = %charging.ceiling, "Settlement-Overrides above the ceiling the buyer signed: capped");
                Some(charging.ceiling)
            }
            Ok(amount) => Some(amount),
            Err(err) => {
                tracing::warn!(route, "{err}: the answer's usage sets the charge");
                None
            }
        }
    }
}

/// What an answer comes to, from what was seen of it: the upstream's own charge if it named one.
fn charge_of(charging: &Charging, overridden: Option<U256>, tapped: &Tapped) -> (U256, ChargeBasis) {
    if let Some(amount) = overridden {
        return (amount, ChargeBasis::Override);
    }
    let measured = Measured { usage: tapped.usage, content_bytes: tapped.content_bytes, complete: tapped.complete };
    metering::charge(&charging.rates, &measured, charging.prompt_bytes, charging.ceiling)
}

/// Why a charge did not settle, and what the buyer gets instead.
enum Refused {
    /// Certainly not charged: this answer (402) instead of the paid one.
    Answer(Response<Body>),
    /// It may still settle: this answer now, and the paid one kept for a retry.
    Withheld(Response<Body>),
    /// A delivered answer whose settlement failed, for this reason.
    Unsettled(String),
    Error(GatewayError),
}

/// Where a streamed answer's frames go, and its head.
struct Stream {
    frames: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    head: HeaderMap,
    status: StatusCode,
}

/// `charge / ceiling`, for the metric: a charge is at most its ceiling, so both fit in `u128` where it matters.
fn ratio(charge: U256, ceiling: U256) -> f64 {
    let approximate = |v: U256| u128::try_from(v).unwrap_or(u128::MAX) as f64;
    if ceiling.is_zero() {
        return 0.0;
    }
    approximate(charge) / approximate(ceiling)
}

/// A response body fed from a task.
struct ChannelBody {
    receiver: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.receiver.poll_recv(cx)
    }
}

impl RequestContext {
    /// A copy for a task that outlives the request's own phases (its access line is already written).
    pub(super) fn detached(&self) -> RequestContext {
        RequestContext {
            started: self.started,
            method: self.method.clone(),
            uri: self.uri.clone(),
            client: self.client.clone(),
            route: self.route.clone(),
            price_key: self.price_key.clone(),
            payment: self.payment.clone(),
            ledger_id: self.ledger_id,
            transaction: self.transaction.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ratio;
    use alloy::primitives::U256;

    #[test]
    fn charge_ratios() {
        assert_eq!(ratio(U256::from(50), U256::from(100)), 0.5);
        assert_eq!(ratio(U256::ZERO, U256::from(100)), 0.0);
        assert_eq!(ratio(U256::from(1), U256::ZERO), 0.0);
        let huge = U256::from(u64::MAX);
        assert!((ratio(huge / U256::from(4), huge) - 0.25).abs() < 1e-6);
    }
}
