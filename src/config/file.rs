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
    pub shutdown_grace_secs: Option<u64>,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub path: String,
    pub methods: Option<Vec<String>>,
    pub upstream: String,
    pub strip_prefix: Option<String>,
}
