//! The payment gate: a paid route's request passes only with a payment that decodes, matches one of the
//! route's offers, verifies, and has not been used before. Everything else gets a 402 challenge or a 400.

pub use x402_proto::Payment;

use crate::pricing::Offer;
use crate::replay::{MemoryGuard, NonceKey, ReplayGuard, ReserveError};
use crate::x402::challenge::SCHEME_EXACT;
use crate::x402::codec::{self, DecodeError, PaymentPayload};
use crate::x402::wire::RequirementsV2;
use crate::x402::Rejection;
use alloy::primitives::Address;
use std::sync::Arc;
use x402_proto::upto_evm;
use x402_proto::{Authorization, Exact, OfferScheme, Scheme};

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Answer with a 402 challenge; `None` when no payment was sent at all.
    #[error("payment required")]
    Challenge(Option<Rejection>),
    #[error("{0}")]
    Malformed(String),
    #[error("too many payments in flight; retry shortly")]
    Busy,
    /// A valid payment whose authorization is already reserved: a retry, or a replay. It is held for this
    /// request, but stays reserved when the hold goes unless the hold is taken over.
    #[error("this authorization has already been used")]
    Reserved(Box<Payment>, Hold),
    /// Another request of this authorization is being served right now: a concurrent duplicate.
    #[error("this authorization is being used by another request")]
    InUse,
}

pub struct PaymentGate {
    /// Shared with every hold, which outlives the borrow of a request's stages.
    guard: Arc<dyn ReplayGuard>,
}

/// One request's hold on an authorization: it is reserved against replay and marked as being served. When the
/// hold goes, the mark goes; the reservation goes too unless the payment may have moved (`spend`), so that a
/// buyer whose payment was certainly not charged may use it again, and nothing else can.
pub struct Hold {
    guard: Arc<dyn ReplayGuard>,
    key: NonceKey,
    release: bool,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold").field("key", &self.key).field("release", &self.release).finish()
    }
}

impl Hold {
    /// The payment may have moved (settlement began, or the ledger says it is spent): it stays reserved until
    /// the authorization expires.
    pub fn spend(&mut self) {
        self.release = false;
    }

    /// The payment was certainly not charged (a failure before any broadcast; or a reservation found in place
    /// by a retry, which the ledger says was never charged): the authorization is freed when the hold goes.
    pub fn not_charged(&mut self) {
        self.release = true;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // A request that panicked may have been anywhere in settling: the authorization stays reserved.
        if self.release && !std::thread::panicking() {
            self.guard.release(&self.key);
        }
        self.guard.end_serving(&self.key);
    }
}

impl PaymentGate {
    /// A gate whose replay protection is this process's memory, for `nonce_cache_capacity` authorizations.
    pub fn new(nonce_cache_capacity: u64) -> PaymentGate {
        PaymentGate::with_guard(Arc::new(MemoryGuard::new(nonce_cache_capacity)))
    }

    pub fn with_guard(guard: Arc<dyn ReplayGuard>) -> PaymentGate {
        PaymentGate { guard }
    }

    /// Checks the request's encoded payment (as its carrier found it; `None`: it carries none) against
    /// `offers`, the offers priced for this very request, and holds its authorization for this request.
    pub fn check(&self, offers: &[Offer], encoded: Option<&[u8]>, now: u64) -> Result<(Payment, Hold), GateError> {
        let raw = encoded.ok_or(GateError::Challenge(None))?;
        // A retry of an authorization already in play is answered as such, even once it has expired.
        let payment =
            self.examine(offers, raw, now, |key| self.guard.contains(key)).map_err(|rejection| match rejection {
                Rejection::MalformedPayload(msg) => GateError::Malformed(msg),
                other => GateError::Challenge(Some(other)),
            })?;
        match self.hold(payment.key, payment.authorization.expires_at())? {
            Held::Fresh(hold) => Ok((payment, hold)),
            Held::Reserved(hold) => Err(GateError::Reserved(Box::new(payment), hold)),
        }
    }

    /// What `check` would make of an encoded payment, holding and reserving nothing: for a route in shadow
    /// mode, which charges nothing. An authorization already reserved (spent, or being served) is a replay.
    pub fn inspect(&self, offers: &[Offer], encoded: &[u8], now: u64) -> Result<Payment, Rejection> {
        let payment = self.examine(offers, encoded, now, |_| false)?;
        if self.guard.contains(&payment.key) {
            return Err(Rejection::Replayed);
        }
        Ok(payment)
    }

    /// A payment recorded before, decoded again to settle it (after a restart): matched to `offer` and its
    /// signature checked, but neither its time window (what is left of it is the settlement's to judge) nor
    /// its reservation (its own ledger row holds that).
    pub fn reopen(&self, offer: &Offer, encoded: &[u8]) -> Result<Payment, Rejection> {
        self.examine(std::slice::from_ref(offer), encoded, 0, |_| true)
    }

    /// Decodes `raw`, matches it to one of `offers` and verifies it offline; its validity window is checked
    /// unless `in_play` says its authorization is reserved already.
    fn examine(
        &self,
        offers: &[Offer],
        raw: &[u8],
        now: u64,
        in_play: impl FnOnce(&NonceKey) -> bool,
    ) -> Result<Payment, Rejection> {
        let payload = codec::decode_payment(raw).map_err(|err| match err {
            DecodeError::Version(v) => Rejection::Version(v),
            other => Rejection::MalformedPayload(other.to_string()),
        })?;
        let (offer, scheme_payload, version) = match &payload {
            PaymentPayload::V2(p) => (match_v2(offers, &p.accepted)?, &p.payload, 2),
            PaymentPayload::V1(p) => (match_v1(offers, &p.scheme, &p.network)?, &p.payload, 1),
        };
        let extensions = match &payload {
            PaymentPayload::V2(p) => p.extensions.as_ref(),
            PaymentPayload::V1(_) => None,
        };
        let (authorization, key) = match offer.scheme {
            OfferScheme::Exact => {
                let authorization = Exact::verify_offline(scheme_payload, offer)?;
                let key = Exact::replay_key(offer, &authorization);
                (Authorization::Exact(authorization), key)
            }
            OfferScheme::Upto { facilitator } => {
                let authorization = upto_evm::verify_signed(scheme_payload, extensions, offer, facilitator)?;
                let key = upto_evm::replay_key(offer, &authorization);
                (Authorization::Upto(authorization), key)
            }
        };
        if !in_play(&key) {
            match &authorization {
                Authorization::Exact(auth) => Exact::check_window(auth, offer, now)?,
                Authorization::Upto(auth) => upto_evm::check_window(auth, offer, now)?,
            }
        }
        let identifier = payment_identifier(&payload)?;
        Ok(Payment { version, offer: offer.clone(), authorization, payload, key, identifier })
    }

    /// Marks `key` as being served and reserves it: fresh, or found reserved already.
    fn hold(&self, key: NonceKey, valid_before: u64) -> Result<Held, GateError> {
        // Marked as served first: the reservation of a request that turns out to be a concurrent duplicate
        // belongs to the other request, and must not be touched.
        if !self.guard.start_serving(key) {
            return Err(GateError::InUse);
        }
        let mut hold = Hold { guard: self.guard.clone(), key, release: false };
        match self.guard.reserve(key, valid_before) {
            Ok(()) => {
                hold.release = true;
                Ok(Held::Fresh(hold))
            }
            Err(ReserveError::Replayed) => Ok(Held::Reserved(hold)),
            Err(ReserveError::Full) => Err(GateError::Busy),
        }
    }
}

enum Held {
    Fresh(Hold),
    Reserved(Hold),
}

impl PaymentGate {
    /// Reserves an authorization the ledger says was spent (at start: replay protection survives a restart).
    pub fn reserve_spent(&self, key: NonceKey, valid_before: u64) {
        let _ = self.guard.reserve(key, valid_before);
    }

    /// How many authorizations are reserved now.
    pub fn reserved(&self) -> u64 {
        self.guard.reserved()
    }
}

/// The offer whose core fields (scheme, network, amount, asset, payTo) the client's `accepted` repeats.
/// Everything else the client echoes (`extra`, timeouts) is ignored: our own offer is what is verified.
fn match_v2<'a>(offers: &'a [Offer], accepted: &RequirementsV2) -> Result<&'a Offer, Rejection> {
    let offers: Vec<&Offer> = offers.iter().filter(|o| o.scheme.name() == accepted.scheme).collect();
    if offers.is_empty() {
        return Err(Rejection::Scheme(accepted.scheme.clone()));
    }
    let same_address = |text: &str, address: Address| text.parse::<Address>().is_ok_and(|a| a == address);
    let on_network: Vec<&Offer> = offers.into_iter().filter(|o| o.network.caip2 == accepted.network).collect();
    if on_network.is_empty() {
        return Err(Rejection::Network(accepted.network.clone()));
    }
    on_network
        .into_iter()
        .find(|o| {
            accepted.amount == o.amount.to_string()
                && same_address(&accepted.asset, o.asset.address)
                && same_address(&accepted.pay_to, o.pay_to)
        })
        .ok_or(Rejection::NoMatchingOffer)
}

/// v1 payloads name only scheme and network: the route's first `exact` offer on that network is the one paid
/// (v1 has no other scheme).
fn match_v1<'a>(offers: &'a [Offer], scheme: &str, network: &str) -> Result<&'a Offer, Rejection> {
    let exact: Vec<&Offer> = offers.iter().filter(|o| o.scheme == OfferScheme::Exact).collect();
    if scheme != SCHEME_EXACT || exact.is_empty() {
        return Err(Rejection::Scheme(scheme.to_string()));
    }
    exact
        .into_iter()
        .find(|o| o.network.v1_name.as_deref() == Some(network) || o.network.caip2 == network)
        .ok_or_else(|| Rejection::Network(network.to_string()))
}

/// The `payment-identifier` extension's id (x402 v2): 16 to 128 of `[A-Za-z0-9_-]`.
fn payment_identifier(payload: &PaymentPayload) -> Result<Option<String>, Rejection> {
    let PaymentPayload::V2(p) = payload else { return Ok(None) };
    let Some(id) = p.extensions.as_ref().and_then(|e| e.pointer("/payment-identifier/info/id")) else {
        return Ok(None);
    };
    match id.as_str() {
        Some(id)
            if (16..=128).contains(&id.len())
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            Ok(Some(id.to_string()))
        }
        _ => Err(Rejection::MalformedPayload("payment-identifier: the id must be 16 to 128 of A-Z a-z 0-9 _ -".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::B256;

    fn key(nonce: u8) -> NonceKey {
        NonceKey { chain_id: 8453, asset: Address::ZERO, from: Address::ZERO, nonce: B256::repeat_byte(nonce) }
    }

    fn fresh(held: Result<Held, GateError>) -> Hold {
        match held {
            Ok(Held::Fresh(hold)) => hold,
            _ => panic!("expected a fresh hold"),
        }
    }

    #[test]
    fn one_request_at_a_time_serves_an_authorization() {
        let gate = PaymentGate::new(16);
        let first = fresh(gate.hold(key(1), u64::MAX));
        assert!(matches!(gate.hold(key(1), u64::MAX), Err(GateError::InUse)), "a second request meanwhile");
        let _other = fresh(gate.hold(key(2), u64::MAX));
        drop(first);
        let _again = fresh(gate.hold(key(1), u64::MAX));
    }

    #[test]
    fn a_hold_frees_its_reservation_unless_the_payment_may_have_moved() {
        let gate = PaymentGate::new(16);
        drop(fresh(gate.hold(key(1), u64::MAX)));
        assert_eq!(gate.reserved(), 0, "certainly not charged: free to use again");

        let mut spent = fresh(gate.hold(key(2), u64::MAX));
        spent.spend();
        drop(spent);
        let Ok(Held::Reserved(retry)) = gate.hold(key(2), u64::MAX) else { panic!("still reserved") };
        drop(retry);
        assert_eq!(gate.reserved(), 1, "a retry's hold leaves the reservation it found");

        let Ok(Held::Reserved(mut taken)) = gate.hold(key(2), u64::MAX) else { panic!("still reserved") };
        taken.not_charged();
        drop(taken);
        assert_eq!(gate.reserved(), 0, "taken over, then not charged: freed");
    }
}
