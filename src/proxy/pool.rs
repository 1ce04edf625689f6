//! Keep-alive HTTP/1.1 connections to plain-http upstreams, one pool per thread.
//!
//! hyper-util's pooled client clones itself, boxes a large future and locks a shared pool for every request:
//! on a free route that was a large share of the gateway's user-space CPU. Here a worker thread owns its idle
//! connections, and checking one out is a pop from a thread-local stack. (https upstreams keep hyper-util's
//! client, for TLS and HTTP/2.)

use super::body::{Body, BoxError};
use crate::options::Upstream;
use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::runtime::{Handle, RuntimeFlavor};
use tower_service::Service;

/// Idle connections kept per upstream and thread; more are closed when their answer ends.
const MAX_IDLE: usize = 256;
/// An idle connection unused this long is closed, as hyper-util's pool does.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often a worker thread looks for expired idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

thread_local! {
    static IDLE: RefCell<Pools> = RefCell::new(Pools { thread: next_thread_number(), by_address: Vec::new() });
}

/// One thread's idle connections.
struct Pools {
    /// Tells this thread's pools from another's: on a multi-threaded runtime an answer's body may be dropped
    /// on another thread than the one its connection came from, where the same index is another upstream.
    thread: u64,
    /// Idle connections by upstream address, most recently used last. Entries are never removed, so an
    /// answer's body can name its pool by index; a thread only ever sees the few addresses configured.
    by_address: Vec<(Authority, VecDeque<Idle>)>,
}

fn next_thread_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Where a connection goes back to: a pool of one thread.
#[derive(Clone, Copy)]
struct PoolSlot {
    thread: u64,
    index: usize,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// Sends `request` (origin-form URI) to `upstream` over an idle connection, or a new one. The connection
/// goes back to the pool when the answer's body has been read to its end.
pub async fn send(mut request: Request<Body>, upstream: &Upstream) -> Result<Response<PooledBody>, BoxError> {
    let pool = pool_of(&upstream.authority);
    while let Some(mut sender) = checkout(pool) {
        // Pooled connections were ready when they came back; one that is not any more has closed.
        if !sender.is_ready() {
            continue;
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Ok(pooled(response, sender, pool)),
            // Closed before the request went out: it is safe to send it again, on another connection.
            Err(mut failed) => match failed.take_message() {
                Some(unsent) => request = unsent,
                None => return Err(failed.into_error().into()),
            },
        }
    }
    // Boxed: connecting is rare, and its future would make every request's larger.
    let mut sender = Box::pin(connect(upstream)).await?;
    let response = sender.send_request(request).await?;
    Ok(pooled(response, sender, pool))
}

/// A new connection, opened as the other outbound clients open theirs.
async fn connect(upstream: &Upstream) -> Result<SendRequest<Body>, BoxError> {
    let mut connector = super::client::tcp_connector();
    let address = Uri::builder().scheme("http").authority(upstream.authority.clone()).path_and_query("/").build()?;
    let stream = connector.call(address).await?;
    let (sender, connection) = http1::handshake(stream).await?;
    let name = upstream.name.clone();
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(upstream = %name, error = %err, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// `authority`'s pool on this thread, made on first use.
fn pool_of(authority: &Authority) -> PoolSlot {
    IDLE.with_borrow_mut(|pools| {
        let thread = pools.thread;
        let list = &mut pools.by_address;
        let index = list.iter().position(|(a, _)| a == authority).unwrap_or_else(|| {
            if list.is_empty() {
                start_sweeping();
            }
            list.push((authority.clone(), VecDeque::new()));
            list.len() - 1
        });
        PoolSlot { thread, index }
    })
}

fn checkout(pool: PoolSlot) -> Option<SendRequest<Body>> {
    IDLE.with_borrow_mut(|pools| {
        let idle = &mut pools.by_address.get_mut(pool.index)?.1;
        drop_expired(idle);
        idle.pop_back().map(|idle| idle.sender)
    })
}

fn release(pool: PoolSlot, sender: SendRequest<Body>) {
    // Not ready: the connection is still sending the request's body (the upstream answered early), or it
    // closed. Either way no other request may wait on it.
    if !sender.is_ready() {
        return;
    }
    // During thread teardown the pool is gone; the connection simply closes. So does one whose answer ended
    // on another thread than its pool's.
    let _ = IDLE.try_with(|pools| {
        let mut pools = pools.borrow_mut();
        if pools.thread != pool.thread {
            return;
        }
        if let Some((_, idle)) = pools.by_address.get_mut(pool.index) {
            if idle.len() < MAX_IDLE {
                idle.push_back(Idle { sender, since: Instant::now() });
            }
        }
    });
}

fn drop_expired(idle: &mut VecDeque<Idle>) {
    while idle.front().is_some_and(|oldest| oldest.since.elapsed() > IDLE_TIMEOUT) {
        idle.pop_front();
    }
}

/// Closes this thread's expired idle connections every [`SWEEP_EVERY`], even when no request comes. Only on a
/// single-threaded runtime (the workers'): elsewhere the task could run on another thread than the pool's,
/// and expired connections are dropped when next met instead.
fn start_sweeping() {
    let Ok(runtime) = Handle::try_current() else { return };
    if runtime.runtime_flavor() != RuntimeFlavor::CurrentThread {
        return;
    }
    runtime.spawn(async {
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            IDLE.with_borrow_mut(|pools| pools.by_address.iter_mut().for_each(|(_, idle)| drop_expired(idle)));
        }
    });
}

fn pooled(response: Response<Incoming>, sender: SendRequest<Body>, pool: PoolSlot) -> Response<PooledBody> {
    response.map(|body| PooledBody { body, ended: false, connection: Some((pool, sender)) })
}

/// An upstream answer's body that returns its connection to the pool once read to the end.
pub struct PooledBody {
    body: Incoming,
    /// The last frame was read (a chunked body says so only by ending).
    ended: bool,
    connection: Option<(PoolSlot, SendRequest<Body>)>,
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body dropped half-read leaves its connection mid-answer: that one closes instead.
        if self.is_end_stream() {
            if let Some((pool, sender)) = self.connection.take() {
                release(pool, sender);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    /// A sender on an in-memory connection: enough to stand in an idle list.
    async fn idle_since(since: Instant) -> Idle {
        let (ours, _theirs) = tokio::io::duplex(64);
        let (sender, _connection) = http1::handshake::<_, Body>(TokioIo::new(ours)).await.unwrap();
        Idle { sender, since }
    }

    #[tokio::test]
    async fn connections_idle_beyond_the_timeout_are_dropped_oldest_first() {
        let now = Instant::now();
        // Instants before the machine started do not exist: on a machine up for less than that, skip.
        let Some(expired) = now.checked_sub(IDLE_TIMEOUT + Duration::from_secs(1)) else { return };
        let Some(recent) = now.checked_sub(IDLE_TIMEOUT - Duration::from_secs(1)) else { return };
        let mut idle = VecDeque::new();
        for since in [expired, expired, recent, now] {
            idle.push_back(idle_since(since).await);
        }
        drop_expired(&mut idle);
        let left: Vec<Instant> = idle.iter().map(|i| i.since).collect();
        assert_eq!(left, [recent, now]);
    }

    /// A sender whose (in-memory) connection is driven, so it is ready for a request.
    async fn ready_sender() -> SendRequest<Body> {
        let (ours, theirs) = tokio::io::duplex(64);
        let (mut sender, connection) = http1::handshake::<_, Body>(TokioIo::new(ours)).await.unwrap();
        tokio::spawn(async move {
            let _theirs = theirs;
            let _ = connection.await;
        });
        sender.ready().await.unwrap();
        sender
    }

    fn idle_count(pool: PoolSlot) -> usize {
        IDLE.with_borrow(|pools| pools.by_address[pool.index].1.len())
    }

    #[tokio::test]
    async fn a_connection_goes_back_only_to_its_own_threads_pool() {
        let here = pool_of(&Authority::from_static("here.example:80"));
        release(here, ready_sender().await);
        assert_eq!(idle_count(here), 1, "released on its own thread: pooled");

        let sender = ready_sender().await;
        let pooled_elsewhere = std::thread::spawn(move || {
            // The same index on this thread is another upstream's pool.
            let there = pool_of(&Authority::from_static("there.example:80"));
            assert_eq!(there.index, here.index);
            release(here, sender);
            idle_count(there)
        });
        assert_eq!(pooled_elsewhere.join().unwrap(), 0);
    }
}
