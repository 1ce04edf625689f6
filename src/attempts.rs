//! Payment attempts per client address. Every request that carries a payment costs a signature check, and
//! one that passes it a facilitator's `/verify` or a simulation on the chain: a token bucket per address
//! keeps one client from spending them faster than `attempt_rate_per_ip`.

use crate::options::AttemptLimit;
use crate::proxy::ClientAddress;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub struct AttemptLimiter {
    limit: AttemptLimit,
    /// Bounded: an address that goes quiet long enough to be full again is forgotten.
    buckets: moka::sync::Cache<ClientAddress, Arc<Mutex<Bucket>>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Addresses tracked at once; beyond it the least recently seen are forgotten (and start full again).
const TRACKED_ADDRESSES: u64 = 100_000;

impl AttemptLimiter {
    pub fn new(limit: AttemptLimit) -> AttemptLimiter {
        let refill = Duration::from_secs_f64(f64::from(limit.burst) / f64::from(limit.per_second));
        let buckets = moka::sync::Cache::builder()
            .max_capacity(TRACKED_ADDRESSES)
            .time_to_idle(refill.max(Duration::from_secs(1)))
            .build();
        AttemptLimiter { limit, buckets }
    }

    /// Takes one attempt for `client`; when none is left, how long until one is, in whole seconds.
    pub fn take(&self, client: ClientAddress, now: Instant) -> Result<(), u64> {
        let burst = f64::from(self.limit.burst);
        let bucket = self.buckets.get_with(client, || Arc::new(Mutex::new(Bucket { tokens: burst, at: now })));
        let mut bucket = bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let rate = f64::from(self.limit.per_second);
        let refilled = now.saturating_duration_since(bucket.at).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refilled).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(((1.0 - bucket.tokens) / rate).ceil().max(1.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn a_burst_then_the_refill_rate_per_address() {
        let limiter = AttemptLimiter::new(AttemptLimit { per_second: 2, burst: 3 });
        let (a, b) = (ClientAddress::of(IpAddr::from([192, 0, 2, 1])), ClientAddress::of(IpAddr::from([192, 0, 2, 2])));
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.take(a, start), Ok(()));
        }
        assert_eq!(limiter.take(a, start), Err(1), "the burst is spent");
        assert_eq!(limiter.take(b, start), Ok(()), "another address has its own bucket");
        assert_eq!(limiter.take(a, start + Duration::from_millis(500)), Ok(()), "one token back after 1/rate");
        assert!(limiter.take(a, start + Duration::from_millis(500)).is_err());
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(limiter.take(a, later), Ok(()), "refilled, up to the burst only");
        }
        assert!(limiter.take(a, later).is_err());
    }
}
