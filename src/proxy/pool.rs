//! Keep-alive HTTP/1.1 connections to plain-http upstreams, one pool per thread.
//!
//! hyper-util's pooled client clones itself, boxes a large future and locks a shared pool for every request:
//! on a free route that was a fifth of the gateway's user-space CPU. Here a worker thread owns its idle
//! connections, and checking one out is a pop from a thread-local stack. (https upstreams keep hyper-util's
//! client, for TLS and HTTP/2.)

use super::body::{Body, BoxError};
use crate::config::Upstream;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections kept per upstream and thread; more are closed when their answer ends.
const MAX_IDLE: usize = 256;
/// An idle connection unused this long is closed, as hyper-util's pool does.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

thread_local! {
    /// Idle connections by upstream (`Upstream::pool`), most recently used last. A few upstreams at most, so a
    /// list beats a map.
    static IDLE: RefCell<Vec<(u64, VecDeque<Idle>)>> = const { RefCell::new(Vec::new()) };
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// Sends `request` (origin-form URI) to `upstream` over an idle connection, or a new one. The connection
/// goes back to the pool when the answer's body has been read to its end.
pub async fn send(mut request: Request<Body>, upstream: &Upstream) -> Result<Response<PooledBody>, BoxError> {
    while let Some(mut sender) = checkout(upstream.pool) {
        if sender.ready().await.is_err() {
            continue; // closed while idle
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Ok(pooled(response, sender, upstream.pool)),
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
    Ok(pooled(response, sender, upstream.pool))
}

async fn connect(upstream: &Upstream) -> Result<SendRequest<Body>, BoxError> {
    let authority = &upstream.authority;
    // An IPv6 literal comes bracketed in a URL, and not in a socket address.
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let stream = TcpStream::connect((host, authority.port_u16().unwrap_or(80))).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

fn checkout(pool: u64) -> Option<SendRequest<Body>> {
    IDLE.with_borrow_mut(|pools| {
        let (_, idle) = pools.iter_mut().find(|(id, _)| *id == pool)?;
        while idle.front().is_some_and(|oldest| oldest.since.elapsed() > IDLE_TIMEOUT) {
            idle.pop_front();
        }
        idle.pop_back().map(|idle| idle.sender)
    })
}

fn release(pool: u64, sender: SendRequest<Body>) {
    if sender.is_closed() {
        return;
    }
    // During thread teardown the pool is gone; the connection simply closes.
    let _ = IDLE.try_with(|pools| {
        let mut pools = pools.borrow_mut();
        let index = match pools.iter().position(|(id, _)| *id == pool) {
            Some(index) => index,
            None => {
                // A new upstream (a reload replaces them all): forget the pools nobody used lately.
                pools.retain(|(_, idle)| idle.back().is_some_and(|newest| newest.since.elapsed() <= IDLE_TIMEOUT));
                pools.push((pool, VecDeque::new()));
                pools.len() - 1
            }
        };
        let idle = &mut pools[index].1;
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { sender, since: Instant::now() });
        }
    });
}

fn pooled(response: Response<Incoming>, sender: SendRequest<Body>, pool: u64) -> Response<PooledBody> {
    response.map(|body| PooledBody { body, ended: false, connection: Some((pool, sender)) })
}

/// An upstream answer's body that returns its connection to the pool once read to the end.
pub struct PooledBody {
    body: Incoming,
    /// The last frame was read (a chunked body says so only by ending).
    ended: bool,
    connection: Option<(u64, SendRequest<Body>)>,
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
        if self.ended || self.body.is_end_stream() {
            if let Some((pool, sender)) = self.connection.take() {
                release(pool, sender);
            }
        }
    }
}
