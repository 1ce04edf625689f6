//! A payment that passed the offline checks, and the key that identifies its authorization against replay.

use crate::codec::PaymentPayload;
use crate::exact_evm::VerifiedAuthorization;
use crate::Offer;
use alloy_primitives::{Address, B256};

/// An authorization as replay protection knows it: settled once, whatever the amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NonceKey {
    pub chain_id: u64,
    pub asset: Address,
    pub from: Address,
    pub nonce: B256,
}

/// A verified payment: the offer it pays, the authorization that passed the offline checks, and the
/// payload as the buyer sent it (a remote facilitator verifies and settles that).
#[derive(Debug, Clone)]
pub struct Payment {
    /// The x402 version the buyer spoke (1: `X-PAYMENT`, 2: `PAYMENT-SIGNATURE`).
    pub version: u8,
    pub offer: Offer,
    pub authorization: VerifiedAuthorization,
    pub payload: PaymentPayload,
    /// The reservation that keeps this authorization from being used twice.
    pub key: NonceKey,
    /// The buyer's `payment-identifier` (idempotency key), when it sent one.
    pub identifier: Option<String>,
}
