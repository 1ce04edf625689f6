//! `GET /v1/models`-style catalogues: the gateway lists what a price table sells, in OpenAI's list shape
//! with each model's x402 price, so agents can discover what is for sale. Built once per configuration.

use crate::options::RouteSpec;
use crate::pricing::{Offer, Pricing};
use crate::x402::challenge::human_amount;
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The catalogue answers by path (canonical, without a trailing slash).
pub fn build(routes: &[RouteSpec]) -> BTreeMap<String, Bytes> {
    let mut lists: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for route in routes {
        let (Some(path), Some(paid)) = (&route.catalogue, &route.payment) else { continue };
        let Pricing::ByRequest(table) = &paid.pricing else { continue };
        let entries = lists.entry(path.trim_end_matches('/').to_string()).or_default();
        for (model, offers) in &table.table {
            entries.push(json!({
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": route.upstream.name,
                "x402": { "route": &*route.pattern_text, "description": paid.description, "accepts": offers.iter().map(price).collect::<Vec<_>>() },
            }));
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
