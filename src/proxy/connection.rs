//! One client connection's budget and clock: the per-client-address cap, the requests in flight on it, and
//! when it has been quiet long enough to close. The server's connection driver asks these; nothing here
//! knows h1 from h2, or TCP from TLS.

use super::body::{Body, BoxError};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

/// Open connections per client address, across every worker thread.
pub struct PerIpCap {
    limit: usize,
    open: Mutex<HashMap<ClientAddress, usize>>,
}

/// A client address as per-client limits count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientAddress {
    V4(u32),
    /// The /64 network: one IPv6 host usually holds all of it, so its addresses one by one would limit nothing.
    V6(u64),
}

impl ClientAddress {
    pub fn of(ip: IpAddr) -> ClientAddress {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientAddress::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientAddress::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// A connection counted against its address until dropped.
pub struct IpSlot {
    cap: Arc<PerIpCap>,
    key: ClientAddress,
}

impl PerIpCap {
    pub fn new(limit: usize) -> Arc<PerIpCap> {
        Arc::new(PerIpCap { limit, open: Mutex::default() })
    }

    /// A slot for one more connection from `ip`, or `None` when that address already has `limit` open.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let key = ClientAddress::of(ip);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(IpSlot { cap: self.clone(), key })
    }

    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.cap.open.lock().unwrap_or_else(PoisonError::into_inner);
        // An address with no connection left is forgotten: the map holds only addresses connected now.
        if let Entry::Occupied(mut count) = open.entry(self.key) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }
}

/// The requests of one connection, in one word so that a request costs one atomic add and one subtract:
/// how many have started (high 32 bits, wrapping) and how many are in flight (low 32 bits).
#[derive(Default)]
pub struct Activity(AtomicU64);

const STARTED: u64 = 1 << 32;

impl Activity {
    /// Counts a request in flight until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.0.fetch_add(STARTED + 1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Whether any request has started on the connection.
    pub fn served_any(&self) -> bool {
        self.now().0 != 0
    }

    /// (requests started, requests in flight)
    fn now(&self) -> (u32, u32) {
        let word = self.0.load(Ordering::Relaxed);
        ((word >> 32) as u32, word as u32)
    }
}

/// A request in flight on its connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight until hyper drops it: sent to the end, or abandoned.
/// A long stream (SSE) is a request in flight, never an idle connection.
pub struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl Tracked {
    pub fn new(body: Body, in_flight: InFlight) -> Tracked {
        Tracked { body, _in_flight: in_flight }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How many looks at a quiet connection make it idle: it is closed after between `idle` and 1.25 × `idle`
/// without a request, while a request costs no clock reading.
const QUIET_LOOKS: u32 = 5;

/// Decides when a connection is to be closed for want of requests: no first request within `first_request`
/// of its start, or none in flight for `idle` since.
pub struct IdleWatch {
    activity: Arc<Activity>,
    first_request: Duration,
    idle: Duration,
    /// Time since the start, as the looks add it up.
    waited: Duration,
    /// Requests started at the last look, and how many looks in a row found nothing new and nothing in flight.
    seen: u32,
    quiet: u32,
}

impl IdleWatch {
    pub fn new(activity: Arc<Activity>, first_request: Duration, idle: Duration) -> IdleWatch {
        IdleWatch { activity, first_request, idle, waited: Duration::ZERO, seen: 0, quiet: 0 }
    }

    /// How long until the next look: a fraction of the idle time, and never past the first-request deadline
    /// while no request has come.
    pub fn next_look(&self) -> Duration {
        let step = self.idle / (QUIET_LOOKS - 1);
        match self.seen {
            0 => step.min(self.first_request.saturating_sub(self.waited)),
            _ => step,
        }
    }

    /// Looks at the connection, `next_look()` after the previous look: whether it should be closed, and why.
    pub fn look(&mut self) -> Look {
        self.waited += self.next_look();
        let (started, in_flight) = self.activity.now();
        if started == 0 && self.seen == 0 {
            return if self.waited >= self.first_request { Look::Unused } else { Look::Open };
        }
        self.quiet = if in_flight == 0 && started == self.seen { self.quiet + 1 } else { 0 };
        self.seen = started;
        if self.quiet >= QUIET_LOOKS {
            Look::Idle
        } else {
            Look::Open
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Look {
    Open,
    /// No request by the first-request deadline (silence, half a preface, a stalled head): nothing to finish.
    Unused,
    /// Served requests, and has none in flight for the idle time.
    Idle,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn the_cap_counts_each_address_and_forgets_it_when_its_last_connection_goes() {
        let cap = PerIpCap::new(2);
        let a = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let (one, two) = (cap.admit(a).expect("first"), cap.admit(a).expect("second"));
        assert!(cap.admit(a).is_none(), "a third from the same address");
        let other = cap.admit(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))).expect("another address is not affected");
        drop(one);
        let three = cap.admit(a).expect("a slot freed by a close");
        drop((two, three, other));
        assert_eq!(cap.addresses(), 0);
    }

    #[test]
    fn an_ipv6_network_counts_as_one_address_and_mapped_ipv4_as_its_ipv4() {
        let cap = PerIpCap::new(1);
        let host = |last: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last));
        let _held = cap.admit(host(1)).expect("first");
        assert!(cap.admit(host(2)).is_none(), "same /64");
        let _elsewhere = cap.admit(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1))).expect("other /64");
        let _v4 = cap.admit(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))).expect("v4");
        assert!(cap.admit("::ffff:192.0.2.1".parse().unwrap()).is_none(), "the same address, mapped");
    }

    #[test]
    fn a_connection_without_a_first_request_closes_at_the_first_look() {
        let activity = Arc::new(Activity::default());
        let mut watch = IdleWatch::new(activity.clone(), Duration::from_secs(3), Duration::from_secs(8));
        assert_eq!(watch.next_look(), Duration::from_secs(2));
        assert_eq!(watch.look(), Look::Open);
        assert_eq!(watch.next_look(), Duration::from_secs(1), "the last look lands on the deadline");
        assert_eq!(watch.look(), Look::Unused);
    }

    #[test]
    fn a_connection_closes_only_after_enough_quiet_looks_in_a_row() {
        let activity = Arc::new(Activity::default());
        let mut watch = IdleWatch::new(activity.clone(), Duration::from_secs(1), Duration::from_secs(4));
        let request = activity.start();
        assert_eq!(watch.look(), Look::Open, "a request arrived before the first deadline");
        assert_eq!(watch.next_look(), Duration::from_secs(1), "a quarter of the idle time");
        // In flight: never idle, however long.
        for _ in 0..20 {
            assert_eq!(watch.look(), Look::Open);
        }
        drop(request);
        for _ in 1..QUIET_LOOKS {
            assert_eq!(watch.look(), Look::Open);
        }
        // A request that starts and ends between two looks resets the count.
        drop(activity.start());
        assert_eq!(watch.look(), Look::Open);
        for _ in 1..QUIET_LOOKS {
            assert_eq!(watch.look(), Look::Open);
        }
        assert_eq!(watch.look(), Look::Idle, "quiet for the idle time");
    }
}
