//! The typed options the gateway runs with: listeners and limits, upstreams, routes and what a paid route
//! sells, the ledger's settings. `config` builds them from `gateway.toml`; nothing below it sees the file.

use crate::answer_urls::AnswerUrls;
use crate::body::Body;
use crate::paths::PathPattern;
use crate::pricing::Pricing;
use crate::settlement::SettleMode;
use http::header::HeaderValue;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use x402_chain::client::HttpsClient;
use x402_chain::options::FacilitatorChoice;

#[derive(Debug, Clone)]
pub struct LedgerSettings {
    pub path: PathBuf,
    /// How often rows left open (timeouts, crashes) are reconciled against the chain.
    pub reconcile_interval: Duration,
    /// Most blocks one `eth_getLogs` of reconciliation spans (the node's provider may cap the range).
    pub reconcile_log_chunk_blocks: NonZeroU64,
    /// Memory for paid answers kept for retries, all bodies together.
    pub answers_max_bytes: u64,
    /// A larger answer is not kept: its retry gets 409 with the transaction hash.
    pub answers_max_body_bytes: usize,
    pub answers_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Option<SocketAddr>,
    pub tls: Option<TlsListener>,
    pub admin_listen: Option<SocketAddr>,
    /// Base URL buyers use to reach the gateway, when it differs from what the request says (behind a proxy).
    pub public_url: Option<String>,
    pub limits: Limits,
}

impl ServerConfig {
    /// Public listeners on an address other hosts can reach while `public_url` is unset: challenges and
    /// discovery there build resource URLs from whatever `Host` a client sends.
    pub fn public_listeners_without_public_url(&self) -> Vec<SocketAddr> {
        if self.public_url.is_some() {
            return Vec::new();
        }
        let listeners = self.listen.iter().chain(self.tls.as_ref().map(|tls| &tls.listen));
        listeners.filter(|addr| !addr.ip().is_loopback()).copied().collect()
    }
}

#[derive(Debug, Clone)]
pub struct TlsListener {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    /// Also the time a new connection (or a TLS one, once its handshake is done) has to send its first request.
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Open public connections from one client address (an IPv6 /64 counts as one address).
    pub max_connections_per_ip: usize,
    /// The admin listener's own budget, apart from the public one, so health checks answer when it is full.
    pub admin_max_connections: usize,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 pings on a connection this quiet; one not acknowledged within `header_read_timeout` closes it.
    pub h2_keepalive: Duration,
    /// A request body the gateway reads whole (to price it) must arrive within this.
    pub body_read_timeout: Duration,
    /// Request bodies held in memory at once, across requests; beyond it a request gets 503.
    pub max_buffered_body_bytes: u64,
    pub shutdown_grace: Duration,
    /// Threads serving the public listeners; `None`: one per core.
    pub workers: Option<usize>,
}

/// An upstream API and the operator's credentials for it.
pub struct Upstream {
    pub name: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// The `Host` header forwarded requests carry: the authority, made a header value once.
    pub host: HeaderValue,
    /// Path prefix of the upstream URL, without a trailing slash (empty for the root).
    pub base_path: String,
    /// Injected into every forwarded request, replacing any client-sent header of the same name.
    pub headers: HeaderMap,
    /// Appended to every forwarded query string, replacing client-sent parameters of the same name.
    pub query: Vec<(String, String)>,
    pub timeout: Duration,
    /// `ca_file`: the upstream's own https client. Without it, https goes through the shared client.
    pub ca: Option<UpstreamCa>,
    /// What the answers' URL headers must lose (the values above) and where the upstream's own URLs point.
    pub answer_urls: AnswerUrls,
}

/// An https upstream's own CA, trusted besides the webpki roots, and the client that trusts it.
pub struct UpstreamCa {
    pub file: PathBuf,
    pub client: HttpsClient<Body>,
}

impl fmt::Debug for Upstream {
    // Header and query values are the operator's secrets: only their names are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("url", &format_args!("{}://{}{}", self.scheme, self.authority, self.base_path))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("query", &self.query.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca.as_ref().map(|ca| &ca.file))
            .finish()
    }
}

#[derive(Debug)]
pub struct RouteSpec {
    /// The pattern as written, used to name the route in logs and `check`.
    pub pattern_text: Arc<str>,
    pub pattern: PathPattern,
    /// `None`: any method.
    pub methods: Option<Vec<Method>>,
    pub upstream: Arc<Upstream>,
    pub strip_prefix: Option<String>,
    /// Whether the method-override headers reach the upstream: an upstream that obeys them would serve a
    /// method this route was not matched (and priced) for.
    pub forward_method_override: bool,
    /// `None` for a free route.
    pub payment: Option<PaidRoute>,
    /// Where the gateway lists this route's price table (`/v1/models`).
    pub catalogue: Option<String>,
}

/// What a paid route sells and for how much.
#[derive(Debug)]
pub struct PaidRoute {
    /// Each set of offers is in a deterministic order: the route's `accepts` order (or its single offer).
    pub pricing: Pricing,
    pub description: String,
    pub mime_type: String,
    pub facilitator: FacilitatorChoice,
    pub settle: SettleMode,
    pub mode: PaymentMode,
    /// The bazaar discovery extension of this route's challenges, when it declares `input`/`output`.
    pub bazaar: Option<Bazaar>,
}

/// Whether a paid route charges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentMode {
    /// Every call is paid for.
    Enforce,
    /// A seller's rollout: calls are served free, the offer goes out with each answer, and the payments sent
    /// anyway are verified (never settled) and counted as the charges they would have been.
    Shadow,
}

/// Discovery metadata (x402 `bazaar` extension), rendered once at load.
#[derive(Debug, Clone)]
pub struct Bazaar {
    /// `extensions.bazaar` of v2 challenges: `{info, schema}`.
    pub extension: serde_json::Value,
    /// `accepts[].outputSchema` of v1 challenges.
    pub output_schema_v1: serde_json::Value,
}

/// Requests carrying a payment, per client address: a token bucket's refill rate per second and its burst.
#[derive(Debug, Clone, Copy)]
pub struct AttemptLimit {
    pub per_second: u32,
    pub burst: u32,
}
