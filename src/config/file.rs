//! The shape of `gateway.toml` exactly as written by the seller. Nothing here is validated or expanded;
//! `super::validate` turns it into the runtime [`super::Config`].

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    #[serde(default)]
    pub routes: Vec<Route>,
    pub payment: Option<Payment>,
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
    #[serde(default)]
    pub ledger: Ledger,
}

/// `[ledger]`: the durable payment record and the store of paid answers for idempotent retries.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Ledger {
    pub path: Option<String>,
    pub reconcile_interval_secs: Option<u64>,
    pub reconcile_log_chunk_blocks: Option<u64>,
    pub answers_max_bytes: Option<u64>,
    pub answers_max_body_bytes: Option<usize>,
    pub answers_ttl_secs: Option<u64>,
}

/// `[payment]`: defaults for every paid route.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    pub pay_to: Option<String>,
    pub network: Option<String>,
    pub asset: Option<String>,
    pub max_timeout_seconds: Option<u64>,
    pub facilitator: Option<String>,
    pub facilitator_auth: Option<String>,
    pub facilitators: Option<Vec<FacilitatorEntry>>,
    pub facilitator_timeout_secs: Option<u64>,
    pub facilitator_max_concurrency: Option<usize>,
    pub settle: Option<String>,
    /// `enforce` (the default) or `shadow`: served free, offered, and what would be charged counted.
    pub mode: Option<String>,
    pub settle_after_max_bytes: Option<usize>,
    pub settle_timeout_secs: Option<u64>,
    pub settle_batch_max: Option<usize>,
    pub settle_batch_window_ms: Option<u64>,
    pub nonce_cache_capacity: Option<u64>,
    pub attempt_rate_per_ip: Option<u32>,
    pub attempt_burst_per_ip: Option<u32>,
}

/// One of `facilitators = [{ url, auth, weight }]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FacilitatorEntry {
    pub url: String,
    pub auth: Option<String>,
    pub weight: Option<u32>,
}

/// Payment terms that `[payment]`, a route and a route's `accepts` entry may each set; the most specific wins.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Terms {
    pub pay_to: Option<String>,
    pub network: Option<String>,
    pub asset: Option<String>,
    pub max_timeout_seconds: Option<u64>,
    pub price: Option<String>,
    pub amount: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub rpc_url: Option<String>,
    pub settler_key: Option<String>,
    pub multicall: Option<String>,
    pub v1_name: Option<String>,
    #[serde(default)]
    pub assets: BTreeMap<String, Asset>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Asset {
    pub address: String,
    pub decimals: u8,
    pub eip712_name: String,
    pub eip712_version: String,
    pub eip2612: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub listen: Option<String>,
    pub tls_listen: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub admin_listen: Option<String>,
    pub public_url: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub max_body_bytes: Option<u64>,
    pub header_read_timeout_secs: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub admin_max_connections: Option<usize>,
    pub idle_timeout_secs: Option<u64>,
    pub h2_keepalive_secs: Option<u64>,
    pub body_read_timeout_secs: Option<u64>,
    pub max_buffered_body_bytes: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    pub workers: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    pub timeout_secs: Option<u64>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub path: String,
    pub methods: Option<Vec<String>>,
    pub upstream: String,
    pub strip_prefix: Option<String>,
    /// Forward `X-HTTP-Method-Override` and its kin, which are dropped otherwise.
    #[serde(default)]
    pub forward_method_override: bool,
    pub pay_to: Option<String>,
    pub network: Option<String>,
    pub asset: Option<String>,
    pub max_timeout_seconds: Option<u64>,
    pub price: Option<PriceSpec>,
    pub amount: Option<String>,
    pub description: Option<String>,
    pub mime_type: Option<String>,
    pub facilitator: Option<String>,
    pub facilitators: Option<Vec<FacilitatorEntry>>,
    pub settle: Option<String>,
    pub mode: Option<String>,
    #[serde(default)]
    pub accepts: Vec<Terms>,
    /// A path (`/v1/models`) where the gateway lists this route's price table, OpenAI style.
    pub catalogue: Option<String>,
    /// JSON Schema of the request's query (GET) or JSON body (POST), for discovery (bazaar).
    pub input: Option<toml::Table>,
    /// JSON Schema of the answer, for discovery (bazaar).
    pub output: Option<toml::Table>,
}

/// `price = "$0.001"`, or `price = { by = "body.model", table = { ... }, default = "$0.05" }`.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum PriceSpec {
    Fixed(String),
    ByRequest(PriceRule),
}

/// `table` prices each value of `by` at one price; `per_token` prices each model by its tokens (`upto`).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PriceRule {
    pub by: String,
    pub table: Option<BTreeMap<String, String>>,
    pub default: Option<String>,
    pub per_token: Option<BTreeMap<String, TokenPrices>>,
    /// The most one request may cost (`per_token`).
    pub max: Option<String>,
    pub default_max_tokens: Option<u64>,
    pub inject_max_tokens: Option<String>,
    /// Ask an OpenAI-compatible upstream for the usage of a stream (`stream_options.include_usage`).
    pub inject_stream_usage: Option<bool>,
}

/// `{ input = "$0.15/1M", output = "$0.60/1M" }`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TokenPrices {
    pub input: String,
    pub output: String,
}

impl Payment {
    pub fn terms(&self) -> Terms {
        Terms {
            pay_to: self.pay_to.clone(),
            network: self.network.clone(),
            asset: self.asset.clone(),
            max_timeout_seconds: self.max_timeout_seconds,
            price: None,
            amount: None,
        }
    }
}

impl Route {
    /// The route's own terms; a price table is not a term (it is applied on top of them).
    pub fn terms(&self) -> Terms {
        let price = match &self.price {
            Some(PriceSpec::Fixed(price)) => Some(price.clone()),
            _ => None,
        };
        Terms {
            pay_to: self.pay_to.clone(),
            network: self.network.clone(),
            asset: self.asset.clone(),
            max_timeout_seconds: self.max_timeout_seconds,
            price,
            amount: self.amount.clone(),
        }
    }
}

impl Terms {
    /// These terms, with anything unset taken from `defaults`.
    pub fn or(&self, defaults: &Terms) -> Terms {
        Terms {
            pay_to: self.pay_to.clone().or_else(|| defaults.pay_to.clone()),
            network: self.network.clone().or_else(|| defaults.network.clone()),
            asset: self.asset.clone().or_else(|| defaults.asset.clone()),
            max_timeout_seconds: self.max_timeout_seconds.or(defaults.max_timeout_seconds),
            // A price belongs to one level: an `accepts` entry with neither takes the route's.
            price: if self.price.is_some() || self.amount.is_some() {
                self.price.clone()
            } else {
                defaults.price.clone()
            },
            amount: if self.price.is_some() || self.amount.is_some() {
                self.amount.clone()
            } else {
                defaults.amount.clone()
            },
        }
    }
}
