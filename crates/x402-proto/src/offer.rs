//! An offer: one way to pay for a resource.

use crate::networks::{Asset, Network};
use alloy_primitives::{Address, B256, U256};
use std::sync::Arc;

/// One way to pay for a route: this amount of this asset on this network, to this address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Shared: every paid request carries its offer, and a network holds its whole asset table.
    pub network: Arc<Network>,
    pub asset: Asset,
    pub pay_to: Address,
    /// Atomic units of `asset`.
    pub amount: U256,
    pub max_timeout_seconds: u64,
    /// The asset's EIP-712 domain separator on this network, hashed once: every signature check needs it.
    pub domain_separator: B256,
    pub scheme: OfferScheme,
}

impl Offer {
    /// This offer (a per-token route's template) as one request's `upto` offer: `ceiling` of its asset,
    /// settled only by `facilitator`.
    pub fn upto(&self, ceiling: U256, facilitator: Address) -> Offer {
        Offer { amount: ceiling, scheme: OfferScheme::Upto { facilitator }, ..self.clone() }
    }
}

/// How the offer is paid, and what the scheme binds the buyer's signature to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferScheme {
    /// EIP-3009 of exactly `amount`; any facilitator can settle it.
    Exact,
    /// Permit2 of at most `amount` (the ceiling); only `facilitator`, which the signature names, can settle it.
    Upto { facilitator: Address },
}

impl OfferScheme {
    /// The scheme's name on the wire (`accepts[].scheme`).
    pub fn name(&self) -> &'static str {
        match self {
            OfferScheme::Exact => "exact",
            OfferScheme::Upto { .. } => "upto",
        }
    }
}
