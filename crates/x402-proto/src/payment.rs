//! A payment that passed the offline checks, and the key that identifies its authorization against replay.

use crate::codec::PaymentPayload;
use crate::exact_evm::VerifiedAuthorization;
use crate::upto_evm::PermitAuthorization;
use crate::Offer;
use alloy_primitives::{Address, B256, U256};

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
    pub authorization: Authorization,
    pub payload: PaymentPayload,
    /// The reservation that keeps this authorization from being used twice.
    pub key: NonceKey,
    /// The buyer's `payment-identifier` (idempotency key), when it sent one.
    pub identifier: Option<String>,
}

/// The buyer's signed authorization, of the offer's scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// EIP-3009 `transferWithAuthorization` of exactly the price.
    Exact(VerifiedAuthorization),
    /// Permit2 witness transfer of at most the ceiling.
    Upto(PermitAuthorization),
}

impl Authorization {
    pub fn payer(&self) -> Address {
        match self {
            Authorization::Exact(auth) => auth.from,
            Authorization::Upto(auth) => auth.from,
        }
    }

    pub fn payee(&self) -> Address {
        match self {
            Authorization::Exact(auth) => auth.to,
            Authorization::Upto(auth) => auth.pay_to,
        }
    }

    /// What the buyer signed for: the price (`exact`) or the ceiling (`upto`).
    pub fn authorized(&self) -> U256 {
        match self {
            Authorization::Exact(auth) => auth.value,
            Authorization::Upto(auth) => auth.ceiling,
        }
    }

    pub fn nonce(&self) -> B256 {
        match self {
            Authorization::Exact(auth) => auth.nonce,
            Authorization::Upto(auth) => auth.nonce_key(),
        }
    }

    /// Unix time after which the authorization can no longer be settled.
    pub fn expires_at(&self) -> u64 {
        match self {
            Authorization::Exact(auth) => auth.valid_before_secs(),
            Authorization::Upto(auth) => auth.deadline_secs(),
        }
    }

    /// Unix time after which a settlement of it may fail: its expiry, or for `upto` the EIP-2612 permit's
    /// deadline if that comes first.
    pub fn settle_by(&self) -> u64 {
        match self {
            Authorization::Exact(auth) => auth.valid_before_secs(),
            Authorization::Upto(auth) => auth.settle_by_secs(),
        }
    }
}
