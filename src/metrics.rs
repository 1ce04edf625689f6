//! Prometheus metrics (OpenMetrics text on the admin listener's `/metrics`).

use crate::settlement::FacilitatorState;
use crate::x402::reason_label;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

/// The `outcome` of a settlement that moved the money.
const SUCCESS: &str = "success";

type Labels = Vec<(&'static str, String)>;

/// The label set counted on every request, cheap to build: the route's name is shared, not copied.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: Arc<str>,
    status: u16,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    /// Requests that matched no route.
    no_route: Arc<str>,
    challenges: Family<Labels, Counter>,
    verified: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    settlements: Family<Labels, Counter>,
    revenue: Family<Labels, Counter>,
    shadow_payments: Family<Labels, Counter>,
    shadow_revenue: Family<Labels, Counter>,
    upstream_latency: Histogram,
    verify_latency: Histogram,
    settle_latency: Histogram,
    in_flight: Gauge,
    nonce_reservations: Gauge,
    metered: Family<Labels, Counter>,
    charged_share: Histogram,
    tokens: Family<Labels, Counter>,
    /// Sampled from the remote facilitators at each scrape, by redacted URL.
    facilitator_healthy: Family<Labels, Gauge>,
    facilitator_limit: Family<Labels, Gauge>,
    facilitator_in_flight: Family<Labels, Gauge>,
    facilitator_retries: Family<Labels, Counter>,
    facilitator_failovers: Family<Labels, Counter>,
    /// One scrape samples and encodes at a time: another's sampling would clear series under it.
    scrape: std::sync::Mutex<()>,
}

fn latency() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// A request counted in flight until this is dropped: also when its client goes away mid-request.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("x402_gateway"),
            requests: Family::default(),
            no_route: Arc::from("-"),
            challenges: Family::default(),
            verified: Family::default(),
            rejected: Family::default(),
            settlements: Family::default(),
            revenue: Family::default(),
            shadow_payments: Family::default(),
            shadow_revenue: Family::default(),
            upstream_latency: latency(),
            verify_latency: latency(),
            settle_latency: latency(),
            in_flight: Gauge::default(),
            nonce_reservations: Gauge::default(),
            metered: Family::default(),
            charged_share: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]),
            tokens: Family::default(),
            facilitator_healthy: Family::default(),
            facilitator_limit: Family::default(),
            facilitator_in_flight: Family::default(),
            facilitator_retries: Family::default(),
            facilitator_failovers: Family::default(),
            scrape: std::sync::Mutex::new(()),
        };
        let r = &mut m.registry;
        r.register("requests", "Requests on the public listeners, by route and status", m.requests.clone());
        r.register("challenges", "402 challenges issued, by route", m.challenges.clone());
        r.register("payments_verified", "Payments that passed verification, by route", m.verified.clone());
        r.register("payments_rejected", "Payments refused, by route and x402 reason", m.rejected.clone());
        r.register(
            "settlements",
            "Settlements, by route and outcome (success or the failure reason)",
            m.settlements.clone(),
        );
        r.register(
            "revenue_atomic",
            "Settled revenue in the asset's atomic units, by route, network and asset",
            m.revenue.clone(),
        );
        r.register(
            "shadow_payments",
            "Payments sent to routes in shadow mode, by route and outcome (valid: would have been charged; invalid, with the reason)",
            m.shadow_payments.clone(),
        );
        r.register(
            "shadow_revenue_atomic",
            "What routes in shadow mode would have charged, in the asset's atomic units, by route, network and asset",
            m.shadow_revenue.clone(),
        );
        r.register("upstream_latency_seconds", "Time to the upstream's response head", m.upstream_latency.clone());
        r.register(
            "verification_latency_seconds",
            "Time to verify a payment (including on-chain simulation or the facilitator)",
            m.verify_latency.clone(),
        );
        r.register("settlement_latency_seconds", "Time to settle a payment", m.settle_latency.clone());
        r.register("in_flight_requests", "Requests being served", m.in_flight.clone());
        r.register("nonce_reservations", "Authorizations reserved against replay", m.nonce_reservations.clone());
        r.register(
            "upto_charges",
            "upto payments metered, by route and basis (usage, override, estimate, nothing)",
            m.metered.clone(),
        );
        r.register(
            "upto_charged_ratio",
            "upto charge as a share of the ceiling the buyer signed",
            m.charged_share.clone(),
        );
        r.register(
            "upto_tokens",
            "Tokens billed on upto routes, by route and kind (prompt, completion)",
            m.tokens.clone(),
        );
        r.register(
            "facilitator_healthy",
            "1 while a remote facilitator is healthy, 0 while it cools down after failures",
            m.facilitator_healthy.clone(),
        );
        r.register(
            "facilitator_concurrency_limit",
            "Calls a remote facilitator is allowed in flight now, by call (verify, settle)",
            m.facilitator_limit.clone(),
        );
        r.register(
            "facilitator_in_flight",
            "Calls in flight to a remote facilitator, by call (verify, settle)",
            m.facilitator_in_flight.clone(),
        );
        r.register(
            "facilitator_retries",
            "Settlements sent again after a failure before any broadcast at this facilitator",
            m.facilitator_retries.clone(),
        );
        r.register(
            "facilitator_failovers",
            "Calls that went on to another facilitator after this one failed them",
            m.facilitator_failovers.clone(),
        );
        m
    }

    pub fn request(&self, route: Option<&Arc<str>>, status: u16) {
        let route = route.unwrap_or(&self.no_route).clone();
        self.requests.get_or_create(&RouteStatus { route, status }).inc();
    }

    pub fn challenge(&self, route: &str) {
        self.challenges.get_or_create(&vec![("route", route.to_string())]).inc();
    }

    pub fn verified(&self, route: &str, took: Duration) {
        self.verified.get_or_create(&vec![("route", route.to_string())]).inc();
        self.verify_latency.observe(took.as_secs_f64());
    }

    /// `reason` may be a remote facilitator's free text: it is labelled `other` unless known.
    pub fn rejected(&self, route: &str, reason: &str) {
        let reason = reason_label(reason);
        self.rejected.get_or_create(&vec![("route", route.to_string()), ("reason", reason.to_string())]).inc();
    }

    /// `outcome` is `success` or the failure's reason, labelled as in `rejected`.
    pub fn settled(&self, route: &str, outcome: &str, took: Duration) {
        let outcome = if outcome == SUCCESS { SUCCESS } else { reason_label(outcome) };
        self.settlements.get_or_create(&vec![("route", route.to_string()), ("outcome", outcome.to_string())]).inc();
        self.settle_latency.observe(took.as_secs_f64());
    }

    pub fn revenue(&self, route: &str, network: &str, asset: &str, amount: u64) {
        let labels = vec![("route", route.to_string()), ("network", network.to_string()), ("asset", asset.to_string())];
        self.revenue.get_or_create(&labels).inc_by(amount);
    }

    /// An `upto` charge, its basis and its share of the ceiling, and the usage it was priced from.
    pub fn metered(&self, route: &str, basis: &'static str, share: f64, usage: Option<(u64, u64)>) {
        self.metered.get_or_create(&vec![("route", route.to_string()), ("basis", basis.to_string())]).inc();
        self.charged_share.observe(share);
        if let Some((prompt, completion)) = usage {
            self.tokens
                .get_or_create(&vec![("route", route.to_string()), ("kind", "prompt".to_string())])
                .inc_by(prompt);
            let completion_labels = vec![("route", route.to_string()), ("kind", "completion".to_string())];
            self.tokens.get_or_create(&completion_labels).inc_by(completion);
        }
    }

    /// A payment a route in shadow mode would have charged, `amount` atomic units of `asset`.
    pub fn shadow_charge(&self, route: &str, network: &str, asset: &str, amount: u64) {
        self.shadow_payments.get_or_create(&vec![("route", route.to_string()), ("outcome", "valid".into())]).inc();
        let labels = vec![("route", route.to_string()), ("network", network.to_string()), ("asset", asset.to_string())];
        self.shadow_revenue.get_or_create(&labels).inc_by(amount);
    }

    /// A payment a route in shadow mode would have refused. `reason` is a label already: a known x402 reason
    /// ([`reason_label`]) or one of the gateway's own.
    pub fn shadow_refusal(&self, route: &str, reason: &'static str) {
        let labels = vec![("route", route.to_string()), ("outcome", "invalid".into()), ("reason", reason.into())];
        self.shadow_payments.get_or_create(&labels).inc();
    }

    pub fn upstream(&self, took: Duration) {
        self.upstream_latency.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text exposition; `reservations` and `facilitators` are sampled now.
    pub fn render(&self, reservations: u64, facilitators: &[FacilitatorState]) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.nonce_reservations.set(i64::try_from(reservations).unwrap_or(i64::MAX));
        self.sample_facilitators(facilitators);
        let mut text = String::new();
        // Encoding into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

impl Metrics {
    /// The series of the facilitators the configuration has now (a reload may drop some), with their counts
    /// as the facilitators keep them.
    fn sample_facilitators(&self, facilitators: &[FacilitatorState]) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.facilitator_healthy.clear();
        self.facilitator_limit.clear();
        self.facilitator_in_flight.clear();
        self.facilitator_retries.clear();
        self.facilitator_failovers.clear();
        for state in facilitators {
            let of = || vec![("facilitator", state.name.clone())];
            let call = |call: &str| vec![("facilitator", state.name.clone()), ("call", call.to_string())];
            self.facilitator_healthy.get_or_create(&of()).set(i64::from(state.healthy));
            for (name, limit, in_flight) in [
                ("verify", state.verify_limit, state.verify_in_flight),
                ("settle", state.settle_limit, state.settle_in_flight),
            ] {
                self.facilitator_limit.get_or_create(&call(name)).set(gauge(limit));
                self.facilitator_in_flight.get_or_create(&call(name)).set(gauge(in_flight));
            }
            let count = |family: &Family<Labels, Counter>, total: u64| {
                family.get_or_create(&of()).inner().store(total, std::sync::atomic::Ordering::Relaxed);
            };
            count(&self.facilitator_retries, state.retries);
            count(&self.facilitator_failovers, state.failovers);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;
    use std::time::Duration;

    #[test]
    fn free_text_reasons_are_labelled_other() {
        let metrics = Metrics::new();
        metrics.rejected("/paid", "invalid_exact_evm_signature");
        metrics.rejected("/paid", "upstream node said: nonce 17 too low");
        metrics.rejected("/paid", "rate limited, retry in 3s");
        metrics.settled("/paid", "success", Duration::ZERO);
        metrics.settled("/paid", "settlement_pending", Duration::ZERO);
        metrics.settled("/paid", "the RPC at https://node.example/KEY timed out", Duration::ZERO);
        let text = metrics.render(0, &[]);
        for series in [
            "x402_gateway_payments_rejected_total{route=\"/paid\",reason=\"invalid_exact_evm_signature\"} 1",
            "x402_gateway_payments_rejected_total{route=\"/paid\",reason=\"other\"} 2",
            "x402_gateway_settlements_total{route=\"/paid\",outcome=\"success\"} 1",
            "x402_gateway_settlements_total{route=\"/paid\",outcome=\"settlement_pending\"} 1",
            "x402_gateway_settlements_total{route=\"/paid\",outcome=\"other\"} 1",
        ] {
            assert!(text.lines().any(|line| line == series), "{series} in:\n{text}");
        }
        assert!(!text.contains("nonce 17") && !text.contains("node.example"), "{text}");
    }
}
