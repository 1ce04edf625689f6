//! `GET /v1/models`-style catalogues: the gateway lists what a price table or a per-token price sells, in
//! OpenAI's list shape with each model's x402 price, so agents can discover what is for sale. Built once per
//! configuration.
//!
//! A per-token model (`upto`) shows its rates as configured and, for each offer's asset, in atomic units per
//! million tokens (what a million tokens are charged, rounded up as every charge is), with the route's cap.

use crate::options::RouteSpec;
use crate::pricing::{ListedModel, Metering, Offer, Pricing};
use crate::x402::challenge::human_amount;
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The catalogue answers by path (canonical, without a trailing slash).
pub fn build(routes: &[RouteSpec]) -> BTreeMap<String, Bytes> {
    let mut lists: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for route in routes {
        let (Some(path), Some(paid)) = (&route.catalogue, &route.payment) else { continue };
        let entries = lists.entry(path.trim_end_matches('/').to_string()).or_default();
        let entry = |model: &str, x402: Value| json!({ "id": model, "object": "model", "created": 0, "owned_by": route.upstream.name, "x402": x402 });
        match &paid.pricing {
            Pricing::ByRequest(table) => {
                for (model, offers) in &table.table {
                    let x402 = json!({
                        "route": &*route.pattern_text,
                        "description": paid.description,
                        "accepts": offers.iter().map(price).collect::<Vec<_>>(),
                    });
                    entries.push(entry(model, x402));
                }
            }
            Pricing::PerToken(metering) => {
                for listed in metering.listed() {
                    let x402 = json!({
                        "route": &*route.pattern_text,
                        "description": paid.description,
                        "scheme": "upto",
                        "pricing": { "input": listed.input, "output": listed.output, "max": metering.written.max },
                        "accepts": per_token_rates(metering, &listed),
                    });
                    entries.push(entry(listed.model, x402));
                }
            }
            Pricing::Fixed(_) => {}
        }
    }
    lists
        .into_iter()
        .map(|(path, data)| (path, Bytes::from(json!({ "object": "list", "data": data }).to_string())))
        .collect()
}

fn price(offer: &Offer) -> Value {
    json!({
        "scheme": "exact",
        "network": offer.network.caip2,
        "asset": offer.asset.address.to_string(),
        "symbol": offer.asset.symbol,
        "amount": offer.amount.to_string(),
        "display": format!("{} {}", human_amount(offer.amount, offer.asset.decimals), offer.asset.symbol),
        "payTo": offer.pay_to.to_string(),
    })
}

/// A per-token model's rates in each of the route's offers: atomic units per million tokens, and the cap
/// (`max`, the offer's amount: no request is charged more).
pub fn per_token_rates(metering: &Metering, listed: &ListedModel<'_>) -> Vec<Value> {
    metering
        .offers
        .iter()
        .zip(&listed.per_million)
        .map(|(offer, (input, output))| {
            let (decimals, symbol) = (offer.asset.decimals, &offer.asset.symbol);
            let human = |amount| human_amount(amount, decimals);
            json!({
                "scheme": offer.scheme.name(),
                "network": offer.network.caip2,
                "asset": offer.asset.address.to_string(),
                "symbol": symbol,
                "payTo": offer.pay_to.to_string(),
                "inputPer1M": input.to_string(),
                "outputPer1M": output.to_string(),
                "max": offer.amount.to_string(),
                "display": format!(
                    "{} {symbol} per 1M input tokens, {} {symbol} per 1M output tokens, at most {} {symbol} a call",
                    human(*input),
                    human(*output),
                    human(offer.amount)
                ),
            })
        })
        .collect()
}
