//! Request bodies read whole before the 402, to price them: each must arrive within a deadline, and all of
//! them together within one memory budget, so unpaid requests cannot pin the gateway's memory.

use crate::body::Body;
use crate::error::GatewayError;
use crate::proxy::upstream::caused_by;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub struct BodyBudget {
    /// Bytes of buffer all requests together may hold.
    limit: u64,
    held: AtomicU64,
    /// For the whole body, from the first byte read.
    deadline: Duration,
}

/// Budget held for one request's buffer, given back when dropped.
pub struct Held<'b> {
    budget: &'b BodyBudget,
    bytes: u64,
}

impl Held<'_> {
    /// Grows this request's share to `bytes` in all; `false`, holding what it had, when the budget has no room.
    fn grow_to(&mut self, bytes: u64) -> bool {
        let more = bytes.saturating_sub(self.bytes);
        let limit = self.budget.limit;
        let taken = self
            .budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| held.checked_add(more).filter(|t| *t <= limit));
        if taken.is_ok() {
            self.bytes += more;
        }
        taken.is_ok()
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl BodyBudget {
    pub fn new(limit: u64, deadline: Duration) -> BodyBudget {
        BodyBudget { limit, held: AtomicU64::new(0), deadline }
    }

    /// Reads `body` whole: at most `max` bytes, within the deadline, and within the budget, which the returned
    /// share holds until it is dropped. A declared length is taken from the budget at once, so a request
    /// that cannot fit is refused before any of its body is read.
    pub async fn read(
        &self,
        mut body: Body,
        max: usize,
        declared: Option<u64>,
    ) -> Result<(Bytes, Held<'_>), GatewayError> {
        let mut held = Held { budget: self, bytes: 0 };
        let read = async {
            let mut buffer = BytesMut::new();
            if let Some(declared) = declared.and_then(|d| usize::try_from(d).ok()).filter(|d| *d <= max) {
                if !held.grow_to(declared as u64) {
                    return Err(GatewayError::BufferedBodiesFull);
                }
                buffer.reserve(declared);
            }
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|err| match caused_by::<http_body_util::LengthLimitError>(&*err) {
                    true => GatewayError::BodyTooLarge,
                    false => GatewayError::BodyUnreadable,
                })?;
                let Ok(data) = frame.into_data() else { continue };
                let needed = buffer.len() + data.len();
                if needed > max {
                    return Err(GatewayError::BodyTooLarge);
                }
                if needed > buffer.capacity() {
                    // Accounted as the buffer grows: by doubling, never past `max`.
                    let capacity = needed.max(buffer.capacity() * 2).min(max);
                    if !held.grow_to(capacity as u64) {
                        return Err(GatewayError::BufferedBodiesFull);
                    }
                    buffer.reserve(capacity - buffer.len());
                }
                buffer.extend_from_slice(&data);
            }
            Ok(buffer.freeze())
        };
        let bytes = tokio::time::timeout(self.deadline, read).await.map_err(|_| GatewayError::BodyTimeout)??;
        Ok((bytes, held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::full;

    #[tokio::test]
    async fn shares_are_taken_as_bodies_grow_and_given_back_when_dropped() {
        let budget = BodyBudget::new(100, Duration::from_secs(5));
        let (bytes, first) = budget.read(full(vec![1u8; 60]), 80, Some(60)).await.expect("fits");
        assert_eq!(bytes.len(), 60);
        assert_eq!(budget.held.load(Ordering::Acquire), 60);
        let refused = budget.read(full(vec![2u8; 50]), 80, Some(50)).await.err();
        assert!(matches!(refused, Some(GatewayError::BufferedBodiesFull)));
        assert_eq!(budget.held.load(Ordering::Acquire), 60, "a refused request holds nothing");
        drop(first);
        let (_, second) = budget.read(full(vec![2u8; 50]), 80, None).await.expect("fits once freed");
        assert!(budget.held.load(Ordering::Acquire) >= 50);
        drop(second);
        assert_eq!(budget.held.load(Ordering::Acquire), 0);
        let too_large = budget.read(full(vec![3u8; 81]), 80, None).await.err();
        assert!(matches!(too_large, Some(GatewayError::BodyTooLarge)));
    }
}
