//! A paid route in shadow mode (`mode = "shadow"`), for a seller's rollout: priced and offered as usual, and
//! served free. A payment sent anyway is judged as an enforced route would judge it (offline, then by the
//! facilitator) and counted and logged as the charge it would have been; nothing is reserved, recorded or
//! settled, and a payment that would be refused is counted, never refused.

use super::context::RequestContext;
use super::{Gateway, Live};
use crate::body::Body;
use crate::carrier::Carrier;
use crate::config::{PaidRoute, RouteSpec};
use crate::error::GatewayError;
use crate::gate::Payment;
use crate::pricing::Offer;
use crate::proxy::upstream::{upstream_request, ClientInfo};
use crate::replay::unix_now;
use crate::settlement::VerifyFailure;
use crate::x402::challenge::Challenge;
use crate::x402::wire::ResourceInfo;
use crate::x402::{reason_label, Rejection};
use alloy::primitives::Address;
use http::{Request, Response};
use std::sync::Arc;
use std::time::Instant;

/// Why an enforced route would have refused a payment.
struct Refused {
    /// A metric label: a known x402 reason, `other`, or one of the gateway's own.
    reason: &'static str,
    /// What the client is told with the offer, when the payment itself is at fault.
    rejection: Option<Rejection>,
    /// Whom the payment names as payer, once it decoded.
    payer: Option<Address>,
}

impl Refused {
    fn rejected(rejection: Rejection, payer: Option<Address>) -> Refused {
        Refused { reason: reason_label(rejection.reason()), rejection: Some(rejection), payer }
    }
}

/// The offer an answer carries: what the request was priced at, and why its payment would be refused.
struct Offered<'r> {
    offers: std::borrow::Cow<'r, [Offer]>,
    resource: ResourceInfo,
    rejection: Option<Rejection>,
}

impl Gateway {
    /// Price → judge the payment sent, if any → upstream, free → the answer with the offer. A request that
    /// cannot be priced (a model the price table lacks) is forwarded as a free route's would be.
    pub(super) async fn process_shadow(
        &self,
        live: &Live,
        request: Request<Body>,
        route: &Arc<RouteSpec>,
        canonical_path: &str,
        ctx: &mut RequestContext,
    ) -> Result<Response<Body>, GatewayError> {
        let Some(paid) = &route.payment else { return Err(GatewayError::Internal) };
        let route_name = &*route.pattern_text;
        let (mut request, body, _buffered) = live.buffer_body_for_pricing(request, paid, &self.buffered).await?;
        let sent = self.carrier.payment(request.headers());
        let offered = match live.price(paid, request.uri().query(), request.headers(), &body).await {
            Ok(priced) => {
                let resource = live.resource_info(&request, paid, priced.key.as_deref(), &ctx.client);
                let offers = priced.offers;
                match sent {
                    None => Some(Offered { offers, resource, rejection: None }),
                    Some(encoded) => match self.judge(live, paid, &offers, encoded, &resource, &ctx.client).await {
                        // It would have been charged: the buyer needs no offer.
                        Ok(payment) => {
                            self.would_charge(route_name, &payment);
                            None
                        }
                        Err(refused) => {
                            Some(Offered { offers, resource, rejection: self.would_refuse(route_name, refused) })
                        }
                    },
                }
            }
            Err(unpriced) => {
                if sent.is_some() {
                    let reason = GatewayError::Price(unpriced).status_and_reason().1;
                    self.would_refuse(route_name, Refused { reason, rejection: None, payer: None });
                }
                None
            }
        };

        self.carrier.strip(request.headers_mut());
        let request = upstream_request(request, route, canonical_path, &ctx.client)?;
        let mut response = self.forward(request, route).await?;
        // An upstream's own charge is for the gateway's eyes, charging or not.
        response.headers_mut().remove(crate::metering::SETTLEMENT_OVERRIDES);
        if let Some(Offered { offers, resource, rejection }) = offered {
            let challenge =
                Challenge { offers: &offers, resource, rejection: rejection.as_ref(), bazaar: paid.bazaar.as_ref() };
            self.carrier.offer(&mut response, &challenge);
        }
        Ok(response)
    }

    /// What an enforced route would have made of this payment: charged (`Ok`), or refused, and why. Payments
    /// count against the client's attempts as on an enforced route, which spares the facilitator a flood.
    async fn judge(
        &self,
        live: &Live,
        paid: &PaidRoute,
        offers: &[Offer],
        encoded: &[u8],
        resource: &ResourceInfo,
        client: &ClientInfo,
    ) -> Result<Payment, Refused> {
        let address = crate::proxy::ClientAddress::of(client.peer.ip());
        if self.attempts.take(address, Instant::now()).is_err() {
            return Err(Refused { reason: "too_many_payment_attempts", rejection: None, payer: None });
        }
        let payment = self.gate.inspect(offers, encoded, unix_now()).map_err(|r| Refused::rejected(r, None))?;
        let payer = Some(payment.authorization.payer());
        let unverified = || Refused { reason: "facilitator_unavailable", rejection: None, payer };
        let Some(facilitator) = live.facilitators.get(&paid.facilitator, payment.offer.network.chain_id) else {
            return Err(unverified());
        };
        match facilitator.verify(&payment, resource).await {
            Ok(()) => Ok(payment),
            Err(VerifyFailure::Rejected(rejection)) => Err(Refused::rejected(rejection, payer)),
            Err(VerifyFailure::Unavailable(_)) => Err(unverified()),
        }
    }

    fn would_charge(&self, route: &str, payment: &Payment) {
        let (offer, auth) = (&payment.offer, &payment.authorization);
        // An `upto` payment would have been charged by its usage: the ceiling is the most it could have been.
        let amount = u64::try_from(auth.authorized()).unwrap_or(u64::MAX);
        self.metrics.shadow_charge(route, &offer.network.caip2, &offer.asset.address.to_string(), amount);
        tracing::info!(
            target: "shadow",
            route,
            payer = %auth.payer(),
            amount = %auth.authorized(),
            network = %offer.network.caip2,
            asset = %offer.asset.address,
            "shadow mode: this payment would have been charged; served free, nothing settled",
        );
    }

    /// Counts and logs the refusal; returns what the client is told with the offer.
    fn would_refuse(&self, route: &str, refused: Refused) -> Option<Rejection> {
        self.metrics.shadow_refusal(route, refused.reason);
        tracing::info!(
            target: "shadow",
            route,
            reason = refused.reason,
            payer = refused.payer.map(|payer| payer.to_string()),
            "shadow mode: this payment would have been refused; served free",
        );
        refused.rejection
    }
}
