//! Listeners: accept TCP (and TLS), cap connections (in all, per client address, apart for admin), serve
//! HTTP/1.1 and HTTP/2, close connections that send nothing or idle, shut down gracefully.

use super::connection::{Activity, IdleWatch, Look, PerIpCap, Tracked};
use super::tls::{self, TlsError};
use super::upstream::ClientInfo;
use crate::body::Body;
use crate::logging::{self, AccessLine};
use crate::options::{Limits, ServerConfig};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What a server serves: the gateway's pipeline, say. The server knows listeners and connections, not what
/// the requests are for.
pub trait Handler: Send + Sync + 'static {
    /// A request on a public listener, from `client`.
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        client: ClientInfo,
    ) -> impl Future<Output = Response<Body>> + Send;

    /// A request on the admin listener.
    fn handle_admin(self: Arc<Self>, request: Request<Incoming>) -> impl Future<Output = Response<Body>> + Send;

    /// Called once, on the runtime that runs the server, when its listeners accept: background work starts
    /// here.
    fn started(self: Arc<Self>) {}
}

/// Which handler a listener serves.
#[derive(Clone, Copy)]
enum Role {
    Public { proto: &'static str },
    Admin,
}

/// A bound socket, outside any runtime: each thread that accepts from it registers its own handle.
#[derive(Clone)]
struct Listener {
    socket: Arc<std::net::TcpListener>,
    role: Role,
    tls: Option<TlsAcceptor>,
}

/// Bound listeners and what they serve, ready to [`Server::run`].
pub struct Server<H> {
    handler: Arc<H>,
    listeners: Vec<Listener>,
    limits: Limits,
}

impl<H: Handler> Server<H> {
    /// Binds the listeners `server` names, to serve `handler`.
    pub async fn bind(server: &ServerConfig, handler: Arc<H>) -> Result<Server<H>, StartError> {
        let mut listeners = Vec::new();
        if let Some(addr) = server.listen {
            listeners.push(Listener {
                socket: bind("server.listen", addr).await?,
                role: Role::Public { proto: "http" },
                tls: None,
            });
        }
        if let Some(tls) = &server.tls {
            let acceptor = tls::acceptor(&tls.cert, &tls.key)?;
            let socket = bind("server.tls_listen", tls.listen).await?;
            listeners.push(Listener { socket, role: Role::Public { proto: "https" }, tls: Some(acceptor) });
        }
        if let Some(addr) = server.admin_listen {
            listeners.push(Listener { socket: bind("server.admin_listen", addr).await?, role: Role::Admin, tls: None });
        }
        Ok(Server { handler, listeners, limits: server.limits.clone() })
    }

    pub fn handler(&self) -> &Arc<H> {
        &self.handler
    }

    /// Bound address of the plain HTTP listener.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.addr_of(|l| matches!(l.role, Role::Public { .. }) && l.tls.is_none())
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.addr_of(|l| l.tls.is_some())
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.addr_of(|l| matches!(l.role, Role::Admin))
    }

    fn addr_of(&self, pick: impl Fn(&Listener) -> bool) -> Option<SocketAddr> {
        self.listeners.iter().find(|l| pick(l)).and_then(|l| l.socket.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets open connections finish for up to
    /// `server.shutdown_grace_secs`.
    ///
    /// The public listeners are served by `server.workers` threads (one per core by default), each running its own single-threaded runtime
    /// that accepts from a shared socket and keeps its connections (and their upstream connections) to itself,
    /// as nginx's workers do: no request wakes another thread. The admin listener and background work
    /// (settlement queues, reconciliation) stay on the calling runtime.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(());
        let (finished_tx, finished_rx) = watch::channel(false);
        // Every connection holds a sender: once all are dropped, every connection has closed.
        let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
        let limits = &self.limits;
        let public_loop = AcceptLoop {
            handler: self.handler.clone(),
            builder: Arc::new(http_builder(limits)),
            budget: Budget {
                permits: Arc::new(Semaphore::new(limits.max_connections)),
                per_ip: Some(PerIpCap::new(limits.max_connections_per_ip)),
            },
            first_request: limits.header_read_timeout,
            idle: limits.idle_timeout,
            open: open_tx.clone(),
        };
        // Its own budget: health checks and metrics answer while the public connections are at their cap.
        let admin_loop = AcceptLoop {
            budget: Budget { permits: Arc::new(Semaphore::new(limits.admin_max_connections)), per_ip: None },
            ..public_loop.clone()
        };
        drop(open_tx);
        let (admin, public): (Vec<Listener>, Vec<Listener>) =
            self.listeners.into_iter().partition(|l| matches!(l.role, Role::Admin));
        for listener in admin.iter().chain(&public) {
            log_listening(listener);
        }
        let mut loops = tokio::task::JoinSet::new();
        for listener in admin {
            loops.spawn(admin_loop.clone().run(listener, stop_rx.clone()));
        }
        // Each worker holds a sender until its accept loops have ended.
        let (workers_tx, mut workers_rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut threads = Vec::new();
        for index in 0..self.limits.workers.unwrap_or_else(cores) {
            let work = Worker {
                accept: public_loop.clone(),
                listeners: public.clone(),
                stop: stop_rx.clone(),
                finished: finished_rx.clone(),
                running: workers_tx.clone(),
            };
            match std::thread::Builder::new().name(format!("x402-worker-{index}")).spawn(|| work.run()) {
                Ok(thread) => threads.push(thread),
                Err(err) => tracing::error!(error = %err, "cannot start a worker thread"),
            }
        }
        if threads.is_empty() {
            tracing::error!("no worker thread could start: serving on the main runtime");
            for listener in &public {
                loops.spawn(public_loop.clone().run(listener.clone(), stop_rx.clone()));
            }
        }
        // The accept loops hold the only handles left: a listener closes as soon as they stop.
        drop((public, workers_tx, public_loop, admin_loop));
        self.handler.clone().started();
        shutdown.await;
        tracing::info!("shutting down: no new connections; waiting for open ones");
        // Ends the accept loops, and asks every open connection to finish what it serves and close.
        drop(stop_tx);
        while loops.join_next().await.is_some() {}
        while workers_rx.recv().await.is_some() {}
        if tokio::time::timeout(self.limits.shutdown_grace, open_rx.recv()).await.is_err() {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
        }
        // The workers' runtimes end now, closing whatever the grace period left open.
        let _ = finished_tx.send(true);
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
    }
}

fn log_listening(listener: &Listener) {
    if let Ok(addr) = listener.socket.local_addr() {
        let kind = match (listener.role, &listener.tls) {
            (Role::Admin, _) => "admin",
            (_, Some(_)) => "https",
            _ => "http",
        };
        tracing::info!(%addr, kind, "listening");
    }
}

/// Cores available to the process, as the system reports them (cgroup quotas included).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// What a worker thread runs: its own runtime, accepting from every public listener until told to stop.
struct Worker<H> {
    accept: AcceptLoop<H>,
    listeners: Vec<Listener>,
    stop: watch::Receiver<()>,
    /// Set once the graceful shutdown is over: until then the worker's connections are still served.
    finished: watch::Receiver<bool>,
    running: tokio::sync::mpsc::Sender<()>,
}

impl<H: Handler> Worker<H> {
    fn run(self) {
        // Access lines are written when the worker runs out of work: one write(2) for a burst of requests.
        let built = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(logging::flush_access_lines)
            .build();
        let runtime = match built {
            Ok(runtime) => runtime,
            Err(err) => return tracing::error!(error = %err, "a worker thread cannot start its runtime"),
        };
        let _held = logging::hold_access_lines();
        let Worker { accept, listeners, stop, mut finished, running } = self;
        runtime.block_on(async move {
            let mut loops = tokio::task::JoinSet::new();
            for listener in listeners {
                loops.spawn(accept.clone().run(listener, stop.clone()));
            }
            while loops.join_next().await.is_some() {}
            // The shared shutdown state first: once `running` goes, the main runtime claims it.
            drop(accept);
            drop(running);
            let _ = finished.wait_for(|done| *done).await;
        });
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<Arc<std::net::TcpListener>, StartError> {
    let bound = TcpListener::bind(addr).await.and_then(TcpListener::into_std);
    bound.map(Arc::new).map_err(|source| StartError::Bind { key, addr, source })
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's floor for its read buffer is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.h2_keepalive)
        .keep_alive_timeout(limits.header_read_timeout)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Connections one listener kind may hold open.
#[derive(Clone)]
struct Budget {
    permits: Arc<Semaphore>,
    per_ip: Option<Arc<PerIpCap>>,
}

struct AcceptLoop<H> {
    handler: Arc<H>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    budget: Budget,
    /// For the TLS handshake, then again for the first request once the protocol runs.
    first_request: Duration,
    idle: Duration,
    open: tokio::sync::mpsc::Sender<()>,
}

// By hand: a derived Clone would ask `H: Clone`, and only the `Arc` is cloned.
impl<H> Clone for AcceptLoop<H> {
    fn clone(&self) -> Self {
        AcceptLoop {
            handler: self.handler.clone(),
            builder: self.builder.clone(),
            budget: self.budget.clone(),
            first_request: self.first_request,
            idle: self.idle,
            open: self.open.clone(),
        }
    }
}

impl<H: Handler> AcceptLoop<H> {
    /// Accepts on `listener` (shared with other threads, registered with this thread's runtime) until `stop`.
    async fn run(self, listener: Listener, mut stop: watch::Receiver<()>) {
        let socket = match listener.socket.try_clone().and_then(TcpListener::from_std) {
            Ok(socket) => socket,
            Err(err) => return tracing::error!(error = %err, "cannot accept on a listener"),
        };
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = socket.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            // Over its address's share, a connection is closed at once: one host cannot take the whole budget.
            let ip_slot = match &self.budget.per_ip {
                Some(cap) => match cap.admit(peer.ip()) {
                    Some(slot) => Some(slot),
                    None => {
                        tracing::debug!(%peer, "connection refused: too many open from this address");
                        continue;
                    }
                },
                None => None,
            };
            // At the connection cap, this connection waits unserved and the loop accepts nothing more: the
            // kernel's backlog holds the rest. (Taking the slot only now keeps idle loops from holding slots.)
            let permit = tokio::select! {
                permit = self.budget.permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
                _ = stop.changed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (handler, builder, role, tls) =
                (self.handler.clone(), self.builder.clone(), listener.role, listener.tls.clone());
            let (first_request, idle, open, stop) = (self.first_request, self.idle, self.open.clone(), stop.clone());
            // The admin listener is plain http.
            let client = ClientInfo::new(peer, if let Role::Public { proto } = role { proto } else { "http" });
            tokio::spawn(async move {
                let _held = (permit, ip_slot, open);
                let activity = Arc::new(Activity::default());
                let watch = IdleWatch::new(activity.clone(), first_request, idle);
                let served = activity.clone();
                let service_client = client.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let (handler, client) = (handler.clone(), service_client.clone());
                    let in_flight = activity.start();
                    async move {
                        let response = match role {
                            Role::Public { .. } => handler.handle(request, client).await,
                            // Boxed: the admin answers' future is large, and every public request would carry its size.
                            Role::Admin => Box::pin(handler.handle_admin(request)).await,
                        };
                        Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
                    }
                });
                let connection = Connection { builder: &builder, activity: served, watch, stop, client: &client };
                match tls {
                    None => connection.serve(tcp, service).await,
                    Some(acceptor) => match tokio::time::timeout(first_request, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection.serve(stream, service).await,
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    },
                }
            });
        }
    }
}

/// One accepted connection, served until it ends, idles, or the server stops.
struct Connection<'a> {
    builder: &'a auto::Builder<TokioExecutor>,
    activity: Arc<Activity>,
    watch: IdleWatch,
    stop: watch::Receiver<()>,
    client: &'a ClientInfo,
}

/// Why a connection's watcher says it must close.
enum Close {
    Unused,
    Idle,
    Stop,
}

impl Connection<'_> {
    async fn serve<IO, S>(self, io: IO, service: S)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<Tracked>, Error = Infallible>
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let connection = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        // The clocks run in a task of their own, so that the connection's own wake-ups (a request, an
        // answer) poll nothing else but this one-shot signal.
        let (close_tx, close_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(watch_connection(self.watch, self.stop, close_tx));
        let ended = tokio::select! {
            biased;
            ended = connection.as_mut() => ended,
            close = close_rx => match close {
                Ok(Close::Unused) => return tracing::debug!(peer = %self.client.peer, "closed: no request in time"),
                // Nothing to finish: a connection that never sent a request is closed at once.
                Ok(Close::Stop) if !self.activity.served_any() => return,
                Ok(Close::Idle) => {
                    connection.as_mut().graceful_shutdown();
                    // A peer that never lets a graceful close finish (an h2 GOAWAY left unacknowledged) is cut off.
                    match tokio::time::timeout(CLOSING_GRACE, connection.as_mut()).await {
                        Ok(ended) => ended,
                        Err(_) => return,
                    }
                }
                Ok(Close::Stop) | Err(_) => {
                    connection.as_mut().graceful_shutdown();
                    connection.as_mut().await
                }
            },
        };
        if let Err(err) = ended {
            log_connection_error(&*err, self.client);
        }
    }
}

/// Looks at a connection on its idle clock, and listens for the server's stop, until the connection ends
/// (`close` is dropped) or must close (said once, on `close`).
async fn watch_connection(
    mut watch: IdleWatch,
    mut stop: watch::Receiver<()>,
    mut close: tokio::sync::oneshot::Sender<Close>,
) {
    let reason = loop {
        tokio::select! {
            _ = close.closed() => return,
            _ = tokio::time::sleep(watch.next_look()) => match watch.look() {
                Look::Open => {}
                Look::Unused => break Close::Unused,
                Look::Idle => break Close::Idle,
            },
            _ = stop.changed() => break Close::Stop,
        }
    };
    let _ = close.send(reason);
}

/// How long an idle connection asked to close may take to do so.
const CLOSING_GRACE: Duration = Duration::from_secs(5);

/// hyper answers a request head it cannot parse itself (400, 431) and never calls the service: the access
/// log gets a line for it here. Other connection errors are the peer's business.
fn log_connection_error(err: &(dyn std::error::Error + 'static), client: &ClientInfo) {
    let status = match err.downcast_ref::<hyper::Error>() {
        Some(e) if e.is_parse_too_large() => 431,
        Some(e) if e.is_parse() => 400,
        _ => return tracing::debug!(peer = %client.peer, error = %err, "connection ended with an error"),
    };
    logging::access(&AccessLine {
        method: "-",
        path: "-",
        route: "-",
        status,
        latency: Duration::ZERO,
        client: client.peer.ip(),
        payer: None,
        amount: None,
        network: None,
        ledger_id: None,
        transaction: None,
    });
}
