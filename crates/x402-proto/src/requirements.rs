//! An offer as the wire carries it: v2 `PaymentRequirements`, and the v1 form.

use crate::wire::{RequirementsV1, RequirementsV2, ResourceInfo};
use crate::{Exact, Offer, OfferScheme, Scheme};

pub const SCHEME_EXACT: &str = Exact::NAME;

/// The offer's `extra`, as its scheme fills it.
fn extra(offer: &Offer) -> serde_json::Value {
    match offer.scheme {
        OfferScheme::Exact => Exact::extra(offer),
        OfferScheme::Upto { facilitator } => crate::upto_evm::extra(offer, facilitator),
    }
}

pub fn requirements_v2(offer: &Offer) -> RequirementsV2 {
    RequirementsV2 {
        scheme: offer.scheme.name().to_string(),
        network: offer.network.caip2.clone(),
        amount: offer.amount.to_string(),
        asset: offer.asset.address.to_string(),
        pay_to: offer.pay_to.to_string(),
        max_timeout_seconds: offer.max_timeout_seconds,
        extra: extra(offer),
    }
}

/// The v1 form of an offer (v1 clients know only chains with a v1 name).
pub fn requirements_v1(offer: &Offer, resource: &ResourceInfo) -> RequirementsV1 {
    RequirementsV1 {
        scheme: offer.scheme.name().to_string(),
        network: offer.network.v1_name.clone().unwrap_or_else(|| offer.network.caip2.clone()),
        max_amount_required: offer.amount.to_string(),
        resource: resource.url.clone(),
        description: resource.description.clone(),
        mime_type: resource.mime_type.clone(),
        output_schema: None,
        pay_to: offer.pay_to.to_string(),
        max_timeout_seconds: offer.max_timeout_seconds,
        asset: offer.asset.address.to_string(),
        extra: extra(offer),
    }
}
