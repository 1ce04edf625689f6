//! Payment schemes: what an offer of the scheme carries, how its payload is checked without a chain, and what
//! identifies an authorization against replay. `exact` (EIP-3009 on EVM) is the first.

use crate::exact_evm::{self, VerifiedAuthorization};
use crate::wire::Eip712Extra;
use crate::{NonceKey, Offer, Rejection};

pub trait Scheme {
    /// The scheme's name on the wire (`accepts[].scheme`).
    const NAME: &'static str;
    /// A payload that passed every offline check.
    type Authorization;

    /// What an offer puts in `extra`.
    fn extra(offer: &Offer) -> serde_json::Value;

    /// Decodes the scheme's payload and checks it against our own copy of the offer, with no chain: the
    /// signature, the amount, the payee.
    fn verify_offline(payload: &serde_json::Value, offer: &Offer) -> Result<Self::Authorization, Rejection>;

    /// Whether the authorization may be settled at `now` (unix seconds), within the offer's timeout.
    fn check_window(authorization: &Self::Authorization, offer: &Offer, now: u64) -> Result<(), Rejection>;

    /// What identifies the authorization for replay protection: it is settled once, whatever the amount.
    fn replay_key(offer: &Offer, authorization: &Self::Authorization) -> NonceKey;

    /// Unix time after which the authorization can no longer be settled.
    fn expires_at(authorization: &Self::Authorization) -> u64;
}

/// `exact` on EVM: an EIP-3009 `transferWithAuthorization` of exactly the price, to the payee.
pub struct Exact;

impl Scheme for Exact {
    const NAME: &'static str = "exact";
    type Authorization = VerifiedAuthorization;

    fn extra(offer: &Offer) -> serde_json::Value {
        let extra = Eip712Extra { name: offer.asset.eip712_name.clone(), version: offer.asset.eip712_version.clone() };
        serde_json::to_value(extra).unwrap_or_default()
    }

    fn verify_offline(payload: &serde_json::Value, offer: &Offer) -> Result<VerifiedAuthorization, Rejection> {
        exact_evm::verify_signed(payload, offer)
    }

    fn check_window(authorization: &VerifiedAuthorization, offer: &Offer, now: u64) -> Result<(), Rejection> {
        exact_evm::check_window(authorization, offer, now)
    }

    fn replay_key(offer: &Offer, authorization: &VerifiedAuthorization) -> NonceKey {
        NonceKey {
            chain_id: offer.network.chain_id,
            asset: offer.asset.address,
            from: authorization.from,
            nonce: authorization.nonce,
        }
    }

    fn expires_at(authorization: &VerifiedAuthorization) -> u64 {
        authorization.valid_before_secs()
    }
}
