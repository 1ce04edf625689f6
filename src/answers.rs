//! Paid answers kept for idempotent retries: a buyer who repeats a settled request with the same
//! authorization (or the same `payment-identifier`) gets the original answer again, never a second charge.
//! Bounded by total bytes and by a per-answer limit; entries expire after a configured time.

use crate::gate::Payment;
use crate::replay::NonceKey;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use moka::sync::Cache;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub struct StoredAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The authorization that paid for it: a `payment-identifier` reused with another one is refused.
    pub paid_by: NonceKey,
    /// Its ledger row, marked served whenever the answer is handed over.
    pub row: i64,
    /// False for an answer withheld while its settlement is pending: it is handed over once the ledger says
    /// the payment settled.
    pub settled: bool,
}

/// Where paid answers are kept for retries: in memory ([`PaidAnswers`]) today, a store shared by replicas next.
pub trait AnswerCache: Send + Sync {
    /// Keeps `answer` for retries of `payment`; false when it is not kept (too large, say).
    fn keep(&self, payment: &Payment, answer: StoredAnswer) -> bool;

    /// The answer already paid for by this authorization, or by this `payment-identifier`.
    fn get(&self, payment: &Payment) -> Option<Arc<StoredAnswer>>;
}

/// Paid answers in this process's memory (`moka`), bounded in bytes and in time.
pub struct PaidAnswers {
    cache: Cache<String, Arc<StoredAnswer>>,
    max_body_bytes: usize,
}

impl PaidAnswers {
    pub fn new(max_bytes: u64, max_body_bytes: usize, ttl: Duration) -> PaidAnswers {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, answer: &Arc<StoredAnswer>| {
                let size = key.len() + answer.body.len() + answer.headers.len() * 64 + 128;
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            .time_to_live(ttl)
            .build();
        PaidAnswers { cache, max_body_bytes }
    }
}

impl AnswerCache for PaidAnswers {
    /// Nothing is kept when the body is over the per-answer limit.
    fn keep(&self, payment: &Payment, answer: StoredAnswer) -> bool {
        if answer.body.len() > self.max_body_bytes {
            return false;
        }
        let answer = Arc::new(answer);
        self.cache.insert(authorization_key(&payment.key), answer.clone());
        if let Some(id) = &payment.identifier {
            self.cache.insert(identifier_key(id), answer);
        }
        true
    }

    fn get(&self, payment: &Payment) -> Option<Arc<StoredAnswer>> {
        payment
            .identifier
            .as_ref()
            .and_then(|id| self.cache.get(&identifier_key(id)))
            .or_else(|| self.cache.get(&authorization_key(&payment.key)))
    }
}

fn authorization_key(key: &NonceKey) -> String {
    format!("auth:{}:{}:{}:{}", key.chain_id, key.asset, key.from, key.nonce)
}

fn identifier_key(id: &str) -> String {
    format!("id:{id}")
}
