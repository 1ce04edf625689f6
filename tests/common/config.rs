//! One typed builder for the tests' gateway configurations. It writes TOML text, so that the same
//! configuration serves a gateway started in the test (`start_gateway`) and the binary reading a file. Tests
//! about the file format itself (syntax errors, unknown keys, the shipped files) keep their TOML literal.
//!
//! ```ignore
//! let toml = GatewayToml::new()
//!     .listen()
//!     .upstream("api", &echo.url())
//!     .route(Route::free("/*", "api"))
//!     .route(Route::priced("/paid", "api", "$0.001"))
//!     .payment(Payment::usdc())
//!     .network(chain.network())
//!     .build();
//! ```

use super::PAY_TO;
use toml::{Table, Value};

/// A whole configuration file. Each setter takes the value the file would hold; `server`, `set` and the like
/// take any other key, for the settings only one test uses.
#[derive(Clone, Default)]
pub struct GatewayToml {
    server: Table,
    upstreams: Table,
    payment: Option<Table>,
    routes: Vec<Value>,
    networks: Table,
    ledger: Table,
}

impl GatewayToml {
    /// Nothing but an empty `[server]`.
    pub fn new() -> GatewayToml {
        GatewayToml::default()
    }

    /// The plain listener on a port the kernel picks.
    pub fn listen(self) -> GatewayToml {
        self.listen_on("127.0.0.1:0")
    }

    /// The plain listener on `addr`, e.g. a port chosen beforehand for the binary.
    pub fn listen_on(self, addr: &str) -> GatewayToml {
        self.server("listen", addr)
    }

    /// The HTTPS listener, on a port the kernel picks, with the repository's development certificate.
    pub fn tls(self) -> GatewayToml {
        let path = |file: &str| super::repo_path(file).display().to_string();
        self.server("tls_listen", "127.0.0.1:0")
            .server("tls_cert", path("certs/server.crt"))
            .server("tls_key", path("certs/server.key"))
    }

    /// The admin listener, on a port the kernel picks.
    pub fn admin(self) -> GatewayToml {
        self.server("admin_listen", "127.0.0.1:0")
    }

    /// Any other `[server]` setting.
    pub fn server(mut self, key: &str, value: impl Into<Value>) -> GatewayToml {
        self.server.insert(key.into(), value.into());
        self
    }

    /// `[upstreams.{name}]` at `url`.
    pub fn upstream(mut self, name: &str, url: &str) -> GatewayToml {
        self.upstreams.insert(name.into(), Value::Table(Table::from_iter([("url".into(), url.into())])));
        self
    }

    /// A header the gateway adds to every request to the upstream `name` (`headers`).
    pub fn upstream_header(mut self, name: &str, header: &str, value: &str) -> GatewayToml {
        let headers = self.upstream_table(name).entry("headers").or_insert_with(|| Value::Table(Table::new()));
        headers.as_table_mut().expect("headers is a table").insert(header.into(), value.into());
        self
    }

    /// Any other setting of the upstream `name`.
    pub fn upstream_setting(mut self, name: &str, key: &str, value: impl Into<Value>) -> GatewayToml {
        self.upstream_table(name).insert(key.into(), value.into());
        self
    }

    fn upstream_table(&mut self, name: &str) -> &mut Table {
        let upstream = self.upstreams.get_mut(name).unwrap_or_else(|| panic!("no upstream {name} yet"));
        upstream.as_table_mut().expect("an upstream is a table")
    }

    /// One more `[[routes]]`, after those already added (order decides among overlapping paths).
    pub fn route(mut self, route: Route) -> GatewayToml {
        self.routes.push(Value::Table(route.0));
        self
    }

    /// `[payment]`, in place of any set before.
    pub fn payment(mut self, payment: Payment) -> GatewayToml {
        self.payment = Some(payment.0);
        self
    }

    /// `[networks.{id}]`, in place of any set before for that network.
    pub fn network(mut self, network: Network) -> GatewayToml {
        self.networks.insert(network.id, Value::Table(network.table));
        self
    }

    /// A `[ledger]` setting.
    pub fn ledger(mut self, key: &str, value: impl Into<Value>) -> GatewayToml {
        self.ledger.insert(key.into(), value.into());
        self
    }

    /// The file, its sections in the order a person would write them.
    pub fn build(&self) -> String {
        let mut sections = vec![("server", Value::Table(self.server.clone()))];
        if !self.upstreams.is_empty() {
            sections.push(("upstreams", Value::Table(self.upstreams.clone())));
        }
        if let Some(payment) = &self.payment {
            sections.push(("payment", Value::Table(payment.clone())));
        }
        if !self.routes.is_empty() {
            sections.push(("routes", Value::Array(self.routes.clone())));
        }
        if !self.networks.is_empty() {
            sections.push(("networks", Value::Table(self.networks.clone())));
        }
        if !self.ledger.is_empty() {
            sections.push(("ledger", Value::Table(self.ledger.clone())));
        }
        sections.into_iter().map(|(name, value)| section(name, value)).collect::<Vec<_>>().join("\n")
    }
}

/// One `[[routes]]` entry.
pub struct Route(Table);

impl Route {
    /// A free route.
    pub fn free(path: &str, upstream: &str) -> Route {
        Route(Table::from_iter([("path".into(), path.into()), ("upstream".into(), upstream.into())]))
    }

    /// A route paid `amount`, in the asset's atomic units.
    pub fn paid(path: &str, upstream: &str, amount: &str) -> Route {
        Route::free(path, upstream).set("amount", amount)
    }

    /// A route paid `price`, in dollars (`"$0.001"`).
    pub fn priced(path: &str, upstream: &str, price: &str) -> Route {
        Route::free(path, upstream).set("price", price)
    }

    pub fn methods(self, methods: &[&str]) -> Route {
        self.set("methods", Value::Array(methods.iter().map(|&method| method.into()).collect()))
    }

    /// `settle`: `"after"` or `"before"` the answer.
    pub fn settle(self, when: &str) -> Route {
        self.set("settle", when)
    }

    /// A facilitator of the route's own.
    pub fn facilitator(self, url: &str) -> Route {
        self.set("facilitator", url)
    }

    /// Any other setting; `toml_value` writes the structured ones (price tables, schemas, offers).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Route {
        self.0.insert(key.into(), value.into());
        self
    }
}

/// `[payment]`.
pub struct Payment(Table);

impl Payment {
    /// USDC on eip155:84532 (TestUSDC on the test chain) to `PAY_TO`.
    pub fn usdc() -> Payment {
        Payment(Table::from_iter([
            ("pay_to".into(), PAY_TO.into()),
            ("network".into(), "eip155:84532".into()),
            ("asset".into(), "USDC".into()),
        ]))
    }

    /// `facilitator`: `"local"` or a remote facilitator's URL.
    pub fn facilitator(self, facilitator: &str) -> Payment {
        self.set("facilitator", facilitator)
    }

    /// Any other `[payment]` setting.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Payment {
        self.0.insert(key.into(), value.into());
        self
    }
}

/// `[networks.{id}]`, as `Chain::network` writes it for a test chain.
pub struct Network {
    id: String,
    table: Table,
}

impl Network {
    pub fn new(id: &str, table: Table) -> Network {
        Network { id: id.into(), table }
    }

    /// The node the gateway asks, e.g. a relay in front of the chain.
    pub fn rpc_url(self, url: &str) -> Network {
        self.set("rpc_url", url)
    }

    /// The Multicall3 contract batched settlements go through.
    pub fn multicall(self, address: impl std::fmt::Display) -> Network {
        self.set("multicall", address.to_string())
    }

    /// A setting of one of its assets (`assets.SYMBOL.key`).
    pub fn asset_setting(mut self, symbol: &str, key: &str, value: impl Into<Value>) -> Network {
        if let Some(Value::Table(asset)) =
            self.table.get_mut("assets").and_then(|assets| assets.as_table_mut()?.get_mut(symbol))
        {
            asset.insert(key.into(), value.into());
        }
        self
    }

    fn set(mut self, key: &str, value: impl Into<Value>) -> Network {
        self.table.insert(key.into(), value.into());
        self
    }

    /// The section alone, as TOML text.
    pub fn toml(&self) -> String {
        section("networks", Value::Table(Table::from_iter([(self.id.clone(), Value::Table(self.table.clone()))])))
    }
}

/// `name = value` at the top of a file, as TOML text.
fn section(name: &str, value: Value) -> String {
    toml::to_string(&Table::from_iter([(name.to_string(), value)])).expect("a table serializes")
}

/// A value written as the file would write it, e.g. `{ by = "body.model", table = { small = "$0.001" } }`.
pub fn toml_value(text: &str) -> Value {
    let mut holder: Table = toml::from_str(&format!("value = {text}")).unwrap_or_else(|e| panic!("{text}: {e}"));
    holder.remove("value").expect("the value")
}
