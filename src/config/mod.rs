//! `gateway.toml`: read, expand `${VAR}`s, validate, and build the runtime configuration.
//! Every error names the key at fault; secrets are expanded only here and are never printed.

mod env;
mod error;
mod file;
mod payment;

pub use crate::options::AttemptLimit;
pub use crate::options::{
    Bazaar, LedgerSettings, Limits, PaidRoute, RouteSpec, ServerConfig, TlsListener, Upstream, UpstreamCa,
};
pub use error::ConfigError;
pub use payment::{BatchSettings, FacilitatorChoice, PaymentSettings, RemoteConfig, RemoteSet, SettlerConfig};

use crate::answer_urls::AnswerUrls;
use crate::networks::Network;
use crate::paths::PathPattern;
use http::header::{HeaderName, HeaderValue};
use http::uri::Scheme;
use http::{HeaderMap, Method, Uri};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use x402_chain::client::https_client_trusting;

pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_H2_KEEPALIVE: Duration = Duration::from_secs(30);
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_BUFFERED_BODY_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Far beyond any core count: a typo, not a machine.
const MAX_WORKERS: usize = 1024;
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Within the block range common RPC providers accept in one `eth_getLogs`.
pub const DEFAULT_RECONCILE_LOG_CHUNK_BLOCKS: NonZeroU64 = NonZeroU64::new(2_000).unwrap();

#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub routes: Vec<RouteSpec>,
    pub payment: PaymentSettings,
    pub ledger: LedgerSettings,
    /// What the operator should hear about but that does not stop the gateway: `check` prints it, `run` logs it.
    pub warnings: Vec<String>,
}

impl Config {
    /// Loads `path`, resolving relative file paths in it against the file's own folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_part(path, |validator, file| validator.config(file))
    }

    pub fn parse(
        text: &str,
        path: &Path,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = read_file(text, path)?;
        Validator { base_dir, env }.config(file)
    }

    /// Only `[ledger]` of the file at `path` (the rest is parsed, not validated): what the commands that read
    /// the ledger need. No other `${VAR}` is expanded, so they run without the secrets that serving needs.
    pub fn load_ledger(path: &Path) -> Result<LedgerSettings, ConfigError> {
        Config::load_part(path, |validator, file| validator.ledger(file.ledger))
    }

    /// The networks (`[networks]` over the built-in table) with their nodes, as reconciliation reads them:
    /// settler keys are neither expanded nor checked.
    pub fn load_networks(path: &Path) -> Result<BTreeMap<u64, Network>, ConfigError> {
        Config::load_part(path, |validator, file| Ok(validator.networks(file.networks)?.by_chain))
    }

    fn load_part<T>(
        path: &Path,
        part: impl FnOnce(&Validator, file::File) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        part(&Validator { base_dir, env: &|name| std::env::var(name).ok() }, read_file(&text, path)?)
    }
}

fn read_file(text: &str, path: &Path) -> Result<file::File, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::parse(path, text, &e))
}

struct Validator<'a> {
    base_dir: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    fn config(&self, file: file::File) -> Result<Config, ConfigError> {
        let server = self.server(file.server)?;
        let mut upstreams = BTreeMap::new();
        for (name, raw) in file.upstreams {
            let upstream = self.upstream(&name, raw)?;
            upstreams.insert(name, Arc::new(upstream));
        }
        let payment = self.payment_settings(file.payment.as_ref(), file.networks)?;
        let routes = file
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                let key = format!("routes[{i}]");
                let paid = self.paid_route(&key, &raw, file.payment.as_ref(), &payment)?;
                self.route(&key, raw, &upstreams, paid)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if server.listen.is_none() && server.tls.is_none() {
            return Err(ConfigError::invalid("server", "set `listen` or `tls_listen` (or both)"));
        }
        let ledger = self.ledger(file.ledger)?;
        let mut warnings = payment::check_payees(&routes)?;
        let unused = upstreams.keys().filter(|name| !routes.iter().any(|route| route.upstream.name == **name));
        warnings.extend(unused.map(|name| format!("upstreams.{name}: no route uses it")));
        Ok(Config { server, upstreams, routes, payment, ledger, warnings })
    }

    fn ledger(&self, raw: file::Ledger) -> Result<LedgerSettings, ConfigError> {
        Ok(LedgerSettings {
            path: self.file_path("ledger.path", raw.path.unwrap_or_else(|| "data/ledger.db".into()))?,
            reconcile_interval: seconds(
                "ledger.reconcile_interval_secs",
                raw.reconcile_interval_secs,
                Duration::from_secs(60),
            )?,
            reconcile_log_chunk_blocks: nonzero("ledger.reconcile_log_chunk_blocks", raw.reconcile_log_chunk_blocks)?
                .and_then(NonZeroU64::new)
                .unwrap_or(DEFAULT_RECONCILE_LOG_CHUNK_BLOCKS),
            answers_max_bytes: positive("ledger.answers_max_bytes", raw.answers_max_bytes, 64 * 1024 * 1024)?,
            answers_max_body_bytes: positive("ledger.answers_max_body_bytes", raw.answers_max_body_bytes, 256 * 1024)?,
            answers_ttl: seconds("ledger.answers_ttl_secs", raw.answers_ttl_secs, Duration::from_secs(3600))?,
        })
    }

    fn expand(&self, key: &str, raw: &str) -> Result<String, ConfigError> {
        env::expand(key, raw, self.env)
    }

    fn socket_addr(&self, key: &str, raw: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
        raw.map(|raw| {
            self.expand(key, &raw)?
                .parse()
                .map_err(|_| ConfigError::invalid(key, format!("`{raw}` is not an address such as \"127.0.0.1:8402\"")))
        })
        .transpose()
    }

    fn file_path(&self, key: &str, raw: String) -> Result<PathBuf, ConfigError> {
        let path = PathBuf::from(self.expand(key, &raw)?);
        Ok(if path.is_absolute() { path } else { self.base_dir.join(path) })
    }

    fn server(&self, raw: file::Server) -> Result<ServerConfig, ConfigError> {
        let tls = match (self.socket_addr("server.tls_listen", raw.tls_listen)?, raw.tls_cert, raw.tls_key) {
            (None, None, None) => None,
            (Some(listen), Some(cert), Some(key)) => Some(TlsListener {
                listen,
                cert: self.file_path("server.tls_cert", cert)?,
                key: self.file_path("server.tls_key", key)?,
            }),
            _ => {
                return Err(ConfigError::invalid(
                    "server.tls_listen",
                    "`tls_listen`, `tls_cert` and `tls_key` go together: set all three or none",
                ))
            }
        };
        let public_url = raw.public_url.map(|url| self.public_url(url)).transpose()?;
        let limits = Limits {
            max_header_bytes: positive("server.max_header_bytes", raw.max_header_bytes, DEFAULT_MAX_HEADER_BYTES)?,
            max_body_bytes: positive("server.max_body_bytes", raw.max_body_bytes, DEFAULT_MAX_BODY_BYTES)?,
            header_read_timeout: seconds(
                "server.header_read_timeout_secs",
                raw.header_read_timeout_secs,
                DEFAULT_HEADER_READ_TIMEOUT,
            )?,
            max_connections: positive("server.max_connections", raw.max_connections, DEFAULT_MAX_CONNECTIONS)?,
            max_connections_per_ip: positive(
                "server.max_connections_per_ip",
                raw.max_connections_per_ip,
                DEFAULT_MAX_CONNECTIONS_PER_IP,
            )?,
            admin_max_connections: positive(
                "server.admin_max_connections",
                raw.admin_max_connections,
                DEFAULT_ADMIN_MAX_CONNECTIONS,
            )?,
            idle_timeout: seconds("server.idle_timeout_secs", raw.idle_timeout_secs, DEFAULT_IDLE_TIMEOUT)?,
            h2_keepalive: seconds("server.h2_keepalive_secs", raw.h2_keepalive_secs, DEFAULT_H2_KEEPALIVE)?,
            body_read_timeout: seconds(
                "server.body_read_timeout_secs",
                raw.body_read_timeout_secs,
                DEFAULT_BODY_READ_TIMEOUT,
            )?,
            max_buffered_body_bytes: positive(
                "server.max_buffered_body_bytes",
                raw.max_buffered_body_bytes,
                DEFAULT_MAX_BUFFERED_BODY_BYTES,
            )?,
            shutdown_grace: match raw.shutdown_grace_secs {
                Some(secs) => Duration::from_secs(secs),
                None => DEFAULT_SHUTDOWN_GRACE,
            },
            workers: match nonzero("server.workers", raw.workers)? {
                Some(n) if n > MAX_WORKERS => {
                    return Err(ConfigError::invalid("server.workers", format!("at most {MAX_WORKERS}")))
                }
                workers => workers,
            },
        };
        Ok(ServerConfig {
            listen: self.socket_addr("server.listen", raw.listen)?,
            tls,
            admin_listen: self.socket_addr("server.admin_listen", raw.admin_listen)?,
            public_url,
            limits,
        })
    }

    fn public_url(&self, raw: String) -> Result<String, ConfigError> {
        let key = "server.public_url";
        let url = self.expand(key, &raw)?;
        let uri: Uri = url.parse().map_err(|_| ConfigError::invalid(key, format!("`{url}` is not a URL")))?;
        if uri.scheme().is_none() || uri.authority().is_none() {
            return Err(ConfigError::invalid(key, "expected an absolute URL such as \"https://api.example.com\""));
        }
        Ok(url.trim_end_matches('/').to_string())
    }

    fn upstream(&self, name: &str, raw: file::Upstream) -> Result<Upstream, ConfigError> {
        let key = format!("upstreams.{name}.url");
        let url = self.expand(&key, &raw.url)?;
        let uri: Uri = url
            .parse()
            .map_err(|_| ConfigError::invalid(&key, "not a valid URL (expected http://host:port/optional/base)"))?;
        let scheme = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            _ => return Err(ConfigError::invalid(&key, "the scheme must be http or https")),
        };
        let authority = uri.authority().cloned().ok_or_else(|| ConfigError::invalid(&key, "the URL has no host"))?;
        if authority.as_str().contains('@') {
            return Err(ConfigError::invalid(
                &key,
                "credentials in the URL are not supported; put them in `headers` or `query`",
            ));
        }
        if uri.query().is_some() {
            return Err(ConfigError::invalid(&key, "put query parameters in `query`, not in the URL"));
        }
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| ConfigError::invalid(&key, "the host is not a valid Host header"))?;
        let base_path = uri.path().trim_end_matches('/').to_string();

        let mut headers = HeaderMap::new();
        for (header, raw_value) in raw.headers {
            let key = format!("upstreams.{name}.headers.{header}");
            let header_name = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| ConfigError::invalid(&key, "not a valid header name"))?;
            let mut value = HeaderValue::from_str(&self.expand(&key, &raw_value)?).map_err(|_| {
                ConfigError::invalid(&key, "the value (after ${VAR} expansion) is not a valid header value")
            })?;
            value.set_sensitive(true);
            headers.insert(header_name, value);
        }
        let query = raw
            .query
            .into_iter()
            .map(|(param, value)| {
                let value = self.expand(&format!("upstreams.{name}.query.{param}"), &value)?;
                Ok((param, value))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let timeout = seconds(&format!("upstreams.{name}.timeout_secs"), raw.timeout_secs, DEFAULT_UPSTREAM_TIMEOUT)?;
        let ca = raw.ca_file.map(|file| self.upstream_ca(name, &scheme, file)).transpose()?;
        let answer_urls = AnswerUrls::new(&scheme, &authority, &base_path, &headers, &query);
        Ok(Upstream {
            name: name.to_string(),
            scheme,
            authority,
            host,
            base_path,
            headers,
            query,
            timeout,
            ca,
            answer_urls,
        })
    }

    /// Reads `upstreams.NAME.ca_file` (PEM certificates) and builds the client that trusts them.
    fn upstream_ca(&self, name: &str, scheme: &Scheme, raw: String) -> Result<UpstreamCa, ConfigError> {
        let key = format!("upstreams.{name}.ca_file");
        if *scheme != Scheme::HTTPS {
            return Err(ConfigError::invalid(&key, "only an https upstream has certificates to check"));
        }
        let file = self.file_path(&key, raw)?;
        let shown = file.display();
        let pem = std::fs::read(&file).map_err(|e| ConfigError::invalid(&key, format!("cannot read {shown}: {e}")))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::invalid(&key, format!("{shown} is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(ConfigError::invalid(&key, format!("{shown} holds no PEM certificate")));
        }
        let client = https_client_trusting(certs)
            .map_err(|e| ConfigError::invalid(&key, format!("{shown}: not a usable CA certificate: {e}")))?;
        Ok(UpstreamCa { file, client })
    }

    fn route(
        &self,
        key: &str,
        raw: file::Route,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        payment: Option<PaidRoute>,
    ) -> Result<RouteSpec, ConfigError> {
        let pattern = PathPattern::parse(&raw.path).map_err(|msg| ConfigError::invalid(format!("{key}.path"), msg))?;
        let methods = raw
            .methods
            .map(|methods| {
                if methods.is_empty() {
                    return Err(ConfigError::invalid(
                        format!("{key}.methods"),
                        "an empty list matches nothing; omit it for any method",
                    ));
                }
                methods
                    .iter()
                    .map(|m| {
                        Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                            ConfigError::invalid(format!("{key}.methods"), format!("`{m}` is not an HTTP method"))
                        })
                    })
                    .collect()
            })
            .transpose()?;
        let upstream = upstreams.get(&raw.upstream).cloned().ok_or_else(|| {
            let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            ConfigError::invalid(
                format!("{key}.upstream"),
                format!("no upstream named `{}` (defined: {})", raw.upstream, known.join(", ")),
            )
        })?;
        use crate::pricing::Pricing;
        let catalogue = match (&raw.catalogue, payment.as_ref().map(|p| &p.pricing)) {
            (None, _) => None,
            (Some(path), Some(Pricing::ByRequest(_) | Pricing::PerToken(_))) if path.starts_with('/') => {
                Some(path.clone())
            }
            (Some(_), Some(Pricing::ByRequest(_) | Pricing::PerToken(_))) => {
                return Err(ConfigError::invalid(format!("{key}.catalogue"), "a path such as \"/v1/models\""))
            }
            (Some(_), _) => {
                return Err(ConfigError::invalid(
                    format!("{key}.catalogue"),
                    "a catalogue lists a price table or per-token prices: set `price = { by = \"body.model\", table = { ... } }` or `per_token = { ... }`",
                ))
            }
        };
        if let Some(prefix) = &raw.strip_prefix {
            if !pattern.has_literal_prefix(prefix) {
                return Err(ConfigError::invalid(
                    format!("{key}.strip_prefix"),
                    format!("`{prefix}` is not a leading part of the route path `{}`", raw.path),
                ));
            }
        }
        Ok(RouteSpec {
            pattern_text: raw.path.into(),
            pattern,
            methods,
            upstream,
            strip_prefix: raw.strip_prefix,
            forward_method_override: raw.forward_method_override,
            catalogue,
            payment,
        })
    }
}

fn positive<T: PartialEq + Default + Copy>(key: &str, value: Option<T>, default: T) -> Result<T, ConfigError> {
    Ok(nonzero(key, value)?.unwrap_or(default))
}

pub(super) fn nonzero<T: PartialEq + Default + Copy>(key: &str, value: Option<T>) -> Result<Option<T>, ConfigError> {
    match value {
        Some(v) if v == T::default() => Err(ConfigError::invalid(key, "must be greater than zero")),
        other => Ok(other),
    }
}

fn seconds(key: &str, value: Option<u64>, default: Duration) -> Result<Duration, ConfigError> {
    Ok(nonzero(key, value)?.map_or(default, Duration::from_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(lines: &str) -> ServerConfig {
        let toml = format!("[server]\n{lines}\n");
        Config::parse(&toml, Path::new("gateway.toml"), Path::new("."), &|_| None).expect("valid").server
    }

    #[test]
    fn a_reachable_listener_without_public_url_is_named() {
        let reachable: SocketAddr = "0.0.0.0:8402".parse().unwrap();
        assert_eq!(server("listen = \"0.0.0.0:8402\"").public_listeners_without_public_url(), [reachable]);
        let tls = "tls_listen = \"[::]:8402\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nadmin_listen = \"0.0.0.0:9\"";
        assert_eq!(server(tls).public_listeners_without_public_url(), ["[::]:8402".parse::<SocketAddr>().unwrap()]);
        assert!(server("listen = \"127.0.0.1:8402\"\ntls_listen = \"[::1]:8443\"\ntls_cert = \"c\"\ntls_key = \"k\"")
            .public_listeners_without_public_url()
            .is_empty());
        let behind = server("listen = \"0.0.0.0:8402\"\npublic_url = \"https://api.example.com\"");
        assert!(behind.public_listeners_without_public_url().is_empty());
    }
}
