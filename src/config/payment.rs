//! Validation of the payment side of `gateway.toml`: networks and assets, and each paid route's offers.

use super::file::{self, Terms};
use super::{ConfigError, Validator};
use crate::metering::{ModelRates, TokenRate, TOKEN_LIMIT_FIELDS};
use crate::networks::{self, Asset, ChainKind, Network};
use crate::options::{AttemptLimit, Bazaar, PaidRoute, PaymentMode};
use crate::pricing::{Metering, Offer, Price, PriceSource, PriceTable, Pricing, WrittenPrices};
use crate::settlement::SettleMode;
use crate::x402::exact_evm;
use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use http::{HeaderValue, Uri};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use x402_proto::OfferScheme;

pub const DEFAULT_MAX_TIMEOUT_SECONDS: u64 = 300;
pub const DEFAULT_NONCE_CACHE_CAPACITY: u64 = 100_000;
pub const DEFAULT_FACILITATOR_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_FACILITATOR_MAX_CONCURRENCY: usize = 32;
/// Beyond any facilitator's real capacity: a typo.
const MAX_FACILITATOR_CONCURRENCY: usize = 4096;
pub const DEFAULT_SETTLE_AFTER_MAX_BYTES: usize = 10 * 1024 * 1024;
pub const DEFAULT_SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Keeps a batch's gas limit (100k per payment) under EIP-7825's 2^24 gas cap per transaction.
pub const MAX_SETTLE_BATCH: usize = 100;
/// A payment must still have time to land after waiting for its batch (it was checked for 6 s of validity).
pub const MAX_SETTLE_BATCH_WINDOW_MS: u64 = 1000;
pub const DEFAULT_SETTLE_BATCH_WINDOW: Duration = Duration::from_millis(20);
/// Multicall3's address on every chain that has it (Base and Base Sepolia among them).
pub const MULTICALL3: Address = alloy::primitives::address!("0xcA11bde05977b3631167028862bE2a173976CA11");
const LOCAL_FACILITATOR: &str = "local";
/// The cap of a per-token route that sets no `max`: under the $1 the stock TypeScript client pays unasked.
pub const DEFAULT_PER_TOKEN_MAX: &str = "$0.50";

pub const DEFAULT_ATTEMPT_RATE_PER_IP: u32 = 50;
pub const DEFAULT_ATTEMPT_BURST_PER_IP: u32 = 200;

pub use x402_chain::options::{
    BatchSettings, FacilitatorChoice, RemoteConfig, RemoteSet, SettlementOptions, SettlerConfig,
};

/// Payment settings shared by all routes.
#[derive(Debug)]
pub struct PaymentSettings {
    /// How many authorizations may be reserved against replay at once.
    pub nonce_cache_capacity: u64,
    /// Requests carrying a payment, per client address: a refill rate per second and a burst.
    pub attempts_per_ip: AttemptLimit,
    /// Every network the configuration knows: the built-in table with `[networks]` applied, by chain id.
    pub networks: BTreeMap<u64, Network>,
    /// Networks where the gateway can settle itself, by chain id.
    pub settlers: BTreeMap<u64, SettlerConfig>,
    pub facilitator_timeout: Duration,
    /// The most calls in flight to one remote facilitator; its limit adapts below it.
    pub facilitator_max_concurrency: usize,
    /// Largest upstream answer held back while a `settle = "after"` payment settles.
    pub settle_after_max_bytes: usize,
    /// Longest wait for a local settlement's receipt (the authorization's expiry may cut it shorter); past it,
    /// the payment is `settlement_pending` and reconciliation finishes it.
    pub settle_timeout: Duration,
    /// `None`: one transaction per payment.
    pub settle_batch: Option<BatchSettings>,
    /// `payment.mode`: every paid route's unless it sets its own.
    pub mode: PaymentMode,
}

impl PaymentSettings {
    /// How settlements are made and waited for, as the settlement crate takes it.
    pub fn settlement(&self) -> SettlementOptions {
        SettlementOptions {
            settle_timeout: self.settle_timeout,
            facilitator_timeout: self.facilitator_timeout,
            facilitator_max_concurrency: self.facilitator_max_concurrency,
            settle_batch: self.settle_batch,
        }
    }
}

/// `[networks]` applied over the built-in table, and the settler keys as written: only what settles expands them.
pub(super) struct Networks {
    pub by_chain: BTreeMap<u64, Network>,
    settler_keys: Vec<SettlerKey>,
}

/// A network's `settler_key`, not yet expanded.
struct SettlerKey {
    chain_id: u64,
    /// `networks."NAME"`, for the errors.
    key: String,
    raw: String,
    multicall: Address,
}

impl Validator<'_> {
    pub(super) fn networks(&self, raw_networks: BTreeMap<String, file::Network>) -> Result<Networks, ConfigError> {
        let mut by_chain = BTreeMap::new();
        let mut settler_keys = Vec::new();
        for (name, raw) in raw_networks {
            let key = format!("networks.\"{name}\"");
            let chain_id = networks::chain_id_of(&name).ok_or_else(|| {
                ConfigError::invalid(
                    &key,
                    "not an EVM network (expected \"eip155:<chain id>\" or a v1 name such as \"base-sepolia\")",
                )
            })?;
            let mut network = networks::builtin(chain_id);
            if let Some(url) = raw.rpc_url {
                network.rpc_url = Some(self.expand(&format!("{key}.rpc_url"), &url)?);
            }
            let multicall = match raw.multicall {
                None => MULTICALL3,
                Some(address) => self
                    .expand(&format!("{key}.multicall"), &address)?
                    .parse::<Address>()
                    .map_err(|_| ConfigError::invalid(format!("{key}.multicall"), "not a 0x contract address"))?,
            };
            if let Some(raw) = raw.settler_key {
                settler_keys.push(SettlerKey { chain_id, key: key.clone(), raw, multicall });
            }
            if raw.v1_name.is_some() {
                network.v1_name = raw.v1_name;
            }
            for (symbol, asset) in raw.assets {
                let asset_key = format!("{key}.assets.{symbol}");
                let address = self
                    .expand(&format!("{asset_key}.address"), &asset.address)?
                    .parse::<Address>()
                    .map_err(|_| ConfigError::invalid(format!("{asset_key}.address"), "not a 0x token address"))?;
                network.assets.retain(|a| !a.symbol.eq_ignore_ascii_case(&symbol));
                network.assets.push(Asset {
                    symbol,
                    address,
                    decimals: asset.decimals,
                    eip712_name: asset.eip712_name,
                    eip712_version: asset.eip712_version,
                    eip2612: asset.eip2612.unwrap_or(true),
                });
            }
            by_chain.insert(chain_id, network);
        }
        Ok(Networks { by_chain, settler_keys })
    }

    pub(super) fn payment_settings(
        &self,
        payment: Option<&file::Payment>,
        raw_networks: BTreeMap<String, file::Network>,
    ) -> Result<PaymentSettings, ConfigError> {
        let Networks { by_chain: networks, settler_keys } = self.networks(raw_networks)?;
        let mut settlers = BTreeMap::new();
        for settler_key in settler_keys {
            let rpc_url = networks.get(&settler_key.chain_id).and_then(|n| n.rpc_url.as_deref());
            settlers.insert(settler_key.chain_id, self.settler(&settler_key, rpc_url)?);
        }
        let capacity = super::nonzero("payment.nonce_cache_capacity", payment.and_then(|p| p.nonce_cache_capacity))?;
        let facilitator_timeout =
            super::nonzero("payment.facilitator_timeout_secs", payment.and_then(|p| p.facilitator_timeout_secs))?
                .map_or(DEFAULT_FACILITATOR_TIMEOUT, Duration::from_secs);
        let facilitator_max_concurrency = match super::nonzero(
            "payment.facilitator_max_concurrency",
            payment.and_then(|p| p.facilitator_max_concurrency),
        )? {
            Some(n) if n > MAX_FACILITATOR_CONCURRENCY => {
                return Err(ConfigError::invalid(
                    "payment.facilitator_max_concurrency",
                    format!("at most {MAX_FACILITATOR_CONCURRENCY}"),
                ))
            }
            n => n.unwrap_or(DEFAULT_FACILITATOR_MAX_CONCURRENCY),
        };
        let settle_after_max_bytes =
            super::nonzero("payment.settle_after_max_bytes", payment.and_then(|p| p.settle_after_max_bytes))?
                .unwrap_or(DEFAULT_SETTLE_AFTER_MAX_BYTES);
        let settle_timeout =
            super::nonzero("payment.settle_timeout_secs", payment.and_then(|p| p.settle_timeout_secs))?
                .map_or(DEFAULT_SETTLE_TIMEOUT, Duration::from_secs);
        let attempts_per_ip = AttemptLimit {
            per_second: super::nonzero("payment.attempt_rate_per_ip", payment.and_then(|p| p.attempt_rate_per_ip))?
                .unwrap_or(DEFAULT_ATTEMPT_RATE_PER_IP),
            burst: super::nonzero("payment.attempt_burst_per_ip", payment.and_then(|p| p.attempt_burst_per_ip))?
                .unwrap_or(DEFAULT_ATTEMPT_BURST_PER_IP),
        };
        let mode = match payment.and_then(|p| p.mode.as_deref()) {
            None => PaymentMode::Enforce,
            Some(raw) => payment_mode("payment.mode", raw)?,
        };
        Ok(PaymentSettings {
            mode,
            attempts_per_ip,
            settle_timeout,
            settle_batch: settle_batch(payment)?,
            nonce_cache_capacity: capacity.unwrap_or(DEFAULT_NONCE_CACHE_CAPACITY),
            networks,
            settlers,
            facilitator_timeout,
            facilitator_max_concurrency,
            settle_after_max_bytes,
        })
    }

    fn settler(&self, settler_key: &SettlerKey, rpc_url: Option<&str>) -> Result<SettlerConfig, ConfigError> {
        let key = &settler_key.key;
        let url_key = format!("{key}.rpc_url");
        let rpc_url =
            rpc_url.ok_or_else(|| ConfigError::invalid(&url_key, "a `settler_key` needs an `rpc_url` to send with"))?;
        let rpc_url: Uri = rpc_url.parse().map_err(|_| ConfigError::invalid(&url_key, "not a URL"))?;
        if !matches!(rpc_url.scheme_str(), Some("http" | "https")) || rpc_url.authority().is_none() {
            return Err(ConfigError::invalid(&url_key, "expected an http(s) URL"));
        }
        let key_key = format!("{key}.settler_key");
        let secret = self.expand(&key_key, &settler_key.raw)?;
        // The message never repeats the value: it is a private key.
        let key = secret
            .trim()
            .parse::<PrivateKeySigner>()
            .map_err(|_| ConfigError::invalid(&key_key, "not a 32-byte hex private key"))?;
        Ok(SettlerConfig { rpc_url, key, multicall: settler_key.multicall })
    }

    /// The route's offers, or `None` for a free route (no price anywhere and no `accepts`).
    pub(super) fn paid_route(
        &self,
        key: &str,
        route: &file::Route,
        payment: Option<&file::Payment>,
        settings: &PaymentSettings,
    ) -> Result<Option<PaidRoute>, ConfigError> {
        let mode = match &route.mode {
            None => settings.mode,
            Some(raw) => payment_mode(&format!("{key}.mode"), raw)?,
        };
        let route_terms = route.terms();
        let rule = match &route.price {
            Some(file::PriceSpec::ByRequest(rule)) => Some(rule),
            _ => None,
        };
        if route.accepts.is_empty() && route_terms.price.is_none() && route_terms.amount.is_none() && rule.is_none() {
            return Ok(None);
        }
        let facilitator = self.facilitator(key, route, payment)?;
        let mut settle = match route.settle.as_deref().or(payment.and_then(|p| p.settle.as_deref())) {
            None | Some("after") => SettleMode::After,
            Some("before") => SettleMode::Before,
            Some(other) => {
                return Err(ConfigError::invalid(
                    format!("{key}.settle"),
                    format!("`{other}`: expected \"after\" or \"before\""),
                ))
            }
        };
        let defaults = route_terms.or(&payment.map(file::Payment::terms).unwrap_or_default());
        let entries: Vec<(String, Terms)> = if route.accepts.is_empty() {
            vec![(key.to_string(), defaults)]
        } else {
            route.accepts.iter().enumerate().map(|(i, t)| (format!("{key}.accepts[{i}]"), t.or(&defaults))).collect()
        };
        let pricing = match rule {
            None => Pricing::Fixed(self.offers(&entries, None, settings)?),
            Some(rule) if rule.per_token.is_some() => {
                // A `[payment]`-wide "before" is for the other routes: this one cannot settle before.
                settle = SettleMode::After;
                if route.settle.as_deref() == Some("before") {
                    return Err(ConfigError::invalid(
                        format!("{key}.settle"),
                        "a per-token price settles what the answer cost, after it: remove `settle = \"before\"`",
                    ));
                }
                Pricing::PerToken(self.metering(key, rule, &entries, &facilitator, settings)?)
            }
            Some(rule) => self.price_table(key, rule, &entries, settings)?,
        };
        if let FacilitatorChoice::Local = facilitator {
            let all = pricing.all_offers();
            if let Some(offer) = all
                .iter()
                .flat_map(|(_, offers)| offers.iter())
                .find(|o| !settings.settlers.contains_key(&o.network.chain_id))
            {
                return Err(ConfigError::invalid(
                    format!("{key}.facilitator"),
                    format!(
                        "\"local\" verifies and settles on {0} itself: set networks.\"{0}\".rpc_url and settler_key, or name a remote facilitator URL",
                        offer.network.caip2
                    ),
                ));
            }
        }
        let method =
            route.methods.as_ref().and_then(|m| m.first()).map_or("GET".to_string(), |m| m.to_ascii_uppercase());
        let bazaar = bazaar(&route.path, &method, route.input.as_ref(), route.output.as_ref());
        Ok(Some(PaidRoute {
            bazaar,
            pricing,
            description: route.description.clone().unwrap_or_default(),
            mime_type: route.mime_type.clone().unwrap_or_default(),
            facilitator,
            settle,
            mode,
        }))
    }

    /// The route's facilitators, else `[payment]`'s, else `local`. At each level, `facilitator = "URL"` (with
    /// `facilitator_auth`) is a list of one.
    fn facilitator(
        &self,
        key: &str,
        route: &file::Route,
        payment: Option<&file::Payment>,
    ) -> Result<FacilitatorChoice, ConfigError> {
        let shared_auth = payment.and_then(|p| p.facilitator_auth.as_deref());
        let route_level =
            self.facilitator_level(key, route.facilitator.as_deref(), route.facilitators.as_deref(), shared_auth)?;
        if let Some(choice) = route_level {
            return Ok(choice);
        }
        let payment_level = match payment {
            Some(p) => {
                self.facilitator_level("payment", p.facilitator.as_deref(), p.facilitators.as_deref(), shared_auth)?
            }
            None => None,
        };
        Ok(payment_level.unwrap_or(FacilitatorChoice::Local))
    }

    /// What `section` (`payment` or `routes[i]`) says, if anything.
    fn facilitator_level(
        &self,
        section: &str,
        single: Option<&str>,
        list: Option<&[file::FacilitatorEntry]>,
        shared_auth: Option<&str>,
    ) -> Result<Option<FacilitatorChoice>, ConfigError> {
        let entries = match (single, list) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    format!("{section}.facilitators"),
                    "set `facilitator` or `facilitators`, not both",
                ))
            }
            (Some(raw), None) => {
                let url_key = format!("{section}.facilitator");
                let url = self.expand(&url_key, raw)?;
                if url == LOCAL_FACILITATOR {
                    return Ok(Some(FacilitatorChoice::Local));
                }
                let url = facilitator_url(&url_key, &url, "\"local\" or an http(s) facilitator URL")?;
                let auth = shared_auth.map(|raw| self.facilitator_auth("payment.facilitator_auth", raw)).transpose()?;
                vec![RemoteConfig { url, auth, weight: 1 }]
            }
            (None, Some([])) => {
                return Err(ConfigError::invalid(
                    format!("{section}.facilitators"),
                    "an empty list settles nothing: name at least one facilitator, or remove the key",
                ))
            }
            (None, Some(list)) => {
                let mut entries: Vec<RemoteConfig> = Vec::with_capacity(list.len());
                for (i, entry) in list.iter().enumerate() {
                    let entry_key = format!("{section}.facilitators[{i}]");
                    let url_key = format!("{entry_key}.url");
                    let url = match self.expand(&url_key, &entry.url)? {
                        local if local == LOCAL_FACILITATOR => return Err(ConfigError::invalid(
                            url_key,
                            "\"local\" is not a remote facilitator: set `facilitator = \"local\"` instead of the list",
                        )),
                        url => facilitator_url(&url_key, &url, "an http(s) facilitator URL")?,
                    };
                    // The message names the other entry, never the URL: it may carry a key.
                    if let Some(first) = entries.iter().position(|known| known.url == url) {
                        return Err(ConfigError::invalid(
                            url_key,
                            format!("the same facilitator as {section}.facilitators[{first}]"),
                        ));
                    }
                    let auth_key = format!("{entry_key}.auth");
                    let auth = entry.auth.as_deref().map(|raw| self.facilitator_auth(&auth_key, raw)).transpose()?;
                    let weight = super::nonzero(&format!("{entry_key}.weight"), entry.weight)?.unwrap_or(1);
                    entries.push(RemoteConfig { url, auth, weight });
                }
                entries
            }
        };
        Ok(Some(FacilitatorChoice::Remote(Arc::new(RemoteSet { facilitators: entries }))))
    }

    /// An `Authorization` value for a facilitator, marked sensitive so that it is never shown.
    fn facilitator_auth(&self, key: &str, raw: &str) -> Result<HeaderValue, ConfigError> {
        let mut value = HeaderValue::from_str(&self.expand(key, raw)?)
            .map_err(|_| ConfigError::invalid(key, "not a valid header value"))?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// The offers of `entries`, each priced at `price` when given (a price table's entry).
    fn offers(
        &self,
        entries: &[(String, Terms)],
        price: Option<&str>,
        settings: &PaymentSettings,
    ) -> Result<Vec<Offer>, ConfigError> {
        entries
            .iter()
            .map(|(entry_key, terms)| {
                let mut terms = terms.clone();
                if let Some(price) = price {
                    terms.price = Some(price.to_string());
                    terms.amount = None;
                }
                self.offer(entry_key, &terms, settings)
            })
            .collect()
    }

    fn price_table(
        &self,
        key: &str,
        rule: &file::PriceRule,
        entries: &[(String, Terms)],
        settings: &PaymentSettings,
    ) -> Result<Pricing, ConfigError> {
        let source =
            PriceSource::parse(&rule.by).map_err(|msg| ConfigError::invalid(format!("{key}.price.by"), msg))?;
        if let Some((entry_key, _)) = entries.iter().find(|(_, t)| t.amount.is_some()) {
            return Err(ConfigError::invalid(
                format!("{entry_key}.amount"),
                "the price comes from the route's price table: remove `amount`",
            ));
        }
        for (field, set) in [
            ("max", rule.max.is_some()),
            ("default_max_tokens", rule.default_max_tokens.is_some()),
            ("inject_max_tokens", rule.inject_max_tokens.is_some()),
            ("inject_stream_usage", rule.inject_stream_usage.is_some()),
        ] {
            if set {
                return Err(ConfigError::invalid(format!("{key}.price.{field}"), "belongs to a `per_token` price"));
            }
        }
        let Some(table) = rule.table.as_ref().filter(|t| !t.is_empty()) else {
            return Err(ConfigError::invalid(format!("{key}.price.table"), "an empty table prices nothing"));
        };
        let table = table
            .iter()
            .map(|(value, price)| {
                let entry_key = format!("{key}.price.table.\"{value}\"");
                let offers =
                    self.offers(entries, Some(price), settings).map_err(|e| rename_price_key(e, &entry_key))?;
                Ok((value.clone(), offers))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let default = rule
            .default
            .as_deref()
            .map(|price| {
                self.offers(entries, Some(price), settings)
                    .map_err(|e| rename_price_key(e, &format!("{key}.price.default")))
            })
            .transpose()?;
        Ok(Pricing::ByRequest(PriceTable { source, table, default }))
    }

    /// A per-token price: `upto` offers capped at `max`, and each model's rates in each offer's asset.
    fn metering(
        &self,
        key: &str,
        rule: &file::PriceRule,
        entries: &[(String, Terms)],
        facilitator: &FacilitatorChoice,
        settings: &PaymentSettings,
    ) -> Result<Metering, ConfigError> {
        let price_key = format!("{key}.price");
        let source =
            PriceSource::parse(&rule.by).map_err(|msg| ConfigError::invalid(format!("{price_key}.by"), msg))?;
        if !matches!(source, PriceSource::Body(_)) {
            return Err(ConfigError::invalid(
                format!("{price_key}.by"),
                "a per-token price reads the model from the body (\"body.model\")",
            ));
        }
        for (field, set) in [("table", rule.table.is_some()), ("default", rule.default.is_some())] {
            if set {
                return Err(ConfigError::invalid(
                    format!("{price_key}.{field}"),
                    "a per-token price lists every model it sells in `per_token`",
                ));
            }
        }
        if let Some((entry_key, _)) = entries.iter().find(|(_, t)| t.amount.is_some() || t.price.is_some()) {
            return Err(ConfigError::invalid(
                format!("{entry_key}.price"),
                "the price comes from the route's per-token rates and `max`: remove `price`/`amount`",
            ));
        }
        let models = rule.per_token.as_ref().filter(|m| !m.is_empty()).ok_or_else(|| {
            ConfigError::invalid(format!("{price_key}.per_token"), "no model: list each one's input and output rates")
        })?;
        let max = rule.max.as_deref().unwrap_or(DEFAULT_PER_TOKEN_MAX);
        let mut offers =
            self.offers(entries, Some(max), settings).map_err(|e| rename_price_key(e, &format!("{price_key}.max")))?;
        for offer in &mut offers {
            let facilitator = match facilitator {
                FacilitatorChoice::Local => settings.settlers.get(&offer.network.chain_id).map(|s| s.key.address()),
                FacilitatorChoice::Remote(_) => None,
            };
            // A remote facilitator's address is learned from its `/supported`; each request's offers name it.
            offer.scheme = OfferScheme::Upto { facilitator: facilitator.unwrap_or(Address::ZERO) };
        }
        let models_written: Vec<&file::TokenPrices> = models.values().collect();
        let models = models
            .iter()
            .map(|(model, prices)| {
                let model_key = format!("{price_key}.per_token.\"{model}\"");
                let rates = offers
                    .iter()
                    .map(|offer| {
                        let decimals = offer.asset.decimals;
                        let rate = |field: &str, text: &str| {
                            TokenRate::parse(text, decimals)
                                .map_err(|msg| ConfigError::invalid(format!("{model_key}.{field}"), msg))
                        };
                        let rates = ModelRates {
                            input: rate("input", &prices.input)?,
                            output: rate("output", &prices.output)?,
                        };
                        if rates.input.is_zero() && rates.output.is_zero() {
                            return Err(ConfigError::invalid(
                                &model_key,
                                "both rates are zero: make the route free instead",
                            ));
                        }
                        Ok(rates)
                    })
                    .collect::<Result<Vec<_>, ConfigError>>()?;
                Ok((model.clone(), rates))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let default_max_tokens = super::nonzero(&format!("{price_key}.default_max_tokens"), rule.default_max_tokens)?;
        if let Some(field) = &rule.inject_max_tokens {
            if !TOKEN_LIMIT_FIELDS.contains(&field.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{price_key}.inject_max_tokens"),
                    format!("`{field}`: expected one of {}", TOKEN_LIMIT_FIELDS.join(", ")),
                ));
            }
            if default_max_tokens.is_none() {
                return Err(ConfigError::invalid(
                    format!("{price_key}.inject_max_tokens"),
                    "injects `default_max_tokens`: set it too",
                ));
            }
        }
        let written = WrittenPrices {
            max: max.to_string(),
            rates: models_written.into_iter().map(|p| (p.input.clone(), p.output.clone())).collect(),
        };
        Ok(Metering {
            source,
            offers,
            models,
            default_max_tokens,
            inject_max_tokens: rule.inject_max_tokens.clone(),
            inject_stream_usage: rule.inject_stream_usage.unwrap_or(false),
            written,
        })
    }

    fn offer(&self, key: &str, terms: &Terms, settings: &PaymentSettings) -> Result<Offer, ConfigError> {
        let required = |value: &Option<String>, field: &str| {
            value.clone().ok_or_else(|| {
                ConfigError::invalid(
                    format!("{key}.{field}"),
                    format!("no `{field}` for this paid route: set it on the route or in [payment]"),
                )
            })
        };
        let network_name = self.expand(&format!("{key}.network"), &required(&terms.network, "network")?)?;
        let chain_id = networks::chain_id_of(&network_name).ok_or_else(|| {
            ConfigError::invalid(
                format!("{key}.network"),
                format!("`{network_name}` is not an EVM network (\"eip155:<chain id>\" or a v1 name)"),
            )
        })?;
        let network = settings.networks.get(&chain_id).cloned().unwrap_or_else(|| networks::builtin(chain_id));
        let asset_name = self.expand(&format!("{key}.asset"), &required(&terms.asset, "asset")?)?;
        let asset = network.asset(&asset_name).cloned().ok_or_else(|| {
            ConfigError::invalid(
                format!("{key}.asset"),
                format!("`{asset_name}` is not known on {}: declare it under [networks.\"{}\".assets.NAME] with address, decimals, eip712_name and eip712_version", network.caip2, network.caip2),
            )
        })?;
        let pay_to = self
            .expand(&format!("{key}.pay_to"), &required(&terms.pay_to, "pay_to")?)?
            .parse::<Address>()
            .map_err(|_| ConfigError::invalid(format!("{key}.pay_to"), "not a 0x address"))?;
        if pay_to == Address::ZERO {
            return Err(ConfigError::invalid(format!("{key}.pay_to"), "the zero address cannot receive payments"));
        }
        let price = match (&terms.price, &terms.amount) {
            (Some(usd), None) => Price::Usd(usd.clone()),
            (None, Some(atomic)) => Price::Atomic(U256::from_str_radix(atomic, 10).map_err(|_| {
                ConfigError::invalid(format!("{key}.amount"), "atomic units as a decimal string, such as \"1000\"")
            })?),
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(format!("{key}.price"), "set `price` or `amount`, not both"))
            }
            (None, None) => {
                return Err(ConfigError::invalid(format!("{key}.price"), "no price: set `price` or `amount`"))
            }
        };
        let amount = price.atomic(asset.decimals).map_err(|msg| {
            ConfigError::invalid(format!("{key}.{}", if terms.price.is_some() { "price" } else { "amount" }), msg)
        })?;
        let max_timeout_seconds = super::nonzero(&format!("{key}.max_timeout_seconds"), terms.max_timeout_seconds)?
            .unwrap_or(DEFAULT_MAX_TIMEOUT_SECONDS);
        let domain_separator =
            exact_evm::domain(&asset.eip712_name, &asset.eip712_version, network.chain_id, asset.address).separator();
        Ok(Offer {
            network: Arc::new(network),
            asset,
            pay_to,
            amount,
            max_timeout_seconds,
            domain_separator,
            scheme: OfferScheme::Exact,
        })
    }
}

/// `url` (expanded) as an http(s) facilitator URL without its trailing slash; `expected` says what `key` holds.
fn facilitator_url(key: &str, url: &str, expected: &str) -> Result<String, ConfigError> {
    let uri: Uri = url.parse().map_err(|_| ConfigError::invalid(key, expected))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(ConfigError::invalid(key, expected));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// A payee whose private key is published (a development account of anvil and hardhat) is refused where
/// money is real, and a warning where it is a test token; on a local development chain it is what one uses.
/// `routes` are in file order, as the keys name them.
pub(super) fn check_payees(routes: &[super::RouteSpec]) -> Result<Vec<String>, ConfigError> {
    let mut warnings = Vec::new();
    for (index, route) in routes.iter().enumerate() {
        let offers = route.payment.iter().flat_map(|paid| paid.pricing.all_offers()).flat_map(|(_, offers)| offers);
        for offer in offers {
            let Some(account) = networks::development_account(offer.pay_to) else { continue };
            let network = &offer.network.caip2;
            let whose = format!(
                "{} is account {account} of the public anvil/hardhat development mnemonic, whose private key is published",
                offer.pay_to
            );
            let warning = match networks::chain_kind(offer.network.chain_id) {
                ChainKind::Mainnet => {
                    return Err(ConfigError::invalid(
                        format!("routes[{index}].pay_to"),
                        format!("{whose}: anyone could take what buyers pay on {network}. Set your own address (pay_to = \"${{PAY_TO}}\")"),
                    ))
                }
                ChainKind::Testnet => format!(
                    "routes[{index}] ({}): pay_to {whose}: anyone can take what buyers pay on {network}; set your own address before selling on a mainnet",
                    route.pattern_text
                ),
                ChainKind::Local => continue,
            };
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
        }
    }
    Ok(warnings)
}

/// A price error found while building a table entry's offers names the table entry, not the route's `price`.
fn rename_price_key(err: ConfigError, entry_key: &str) -> ConfigError {
    match err {
        ConfigError::Invalid { key, message } if key.ends_with(".price") => ConfigError::invalid(entry_key, message),
        other => other,
    }
}

/// The bazaar extension for a route that declares its input and/or output schema; a dynamic `pattern`'s
/// extension names its route template, as the reference's does.
fn bazaar(pattern: &str, method: &str, input: Option<&toml::Table>, output: Option<&toml::Table>) -> Option<Bazaar> {
    if input.is_none() && output.is_none() {
        return None;
    }
    let to_json = |table: Option<&toml::Table>| table.and_then(|t| serde_json::to_value(t).ok());
    let mut http_input = serde_json::json!({ "type": "http", "method": method });
    if let Some(schema) = to_json(input) {
        if matches!(method, "POST" | "PUT" | "PATCH") {
            http_input["bodyType"] = "json".into();
            http_input["body"] = schema;
        } else {
            http_input["queryParams"] = schema;
        }
    }
    let mut info = serde_json::json!({ "input": http_input });
    if let Some(schema) = to_json(output) {
        info["output"] = serde_json::json!({ "type": "json", "schema": schema });
    }
    let mut v1_input = info["input"].clone();
    v1_input["discoverable"] = true.into();
    let output_schema_v1 = serde_json::json!({ "input": v1_input, "output": info.get("output").cloned() });
    let schema = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": { "input": { "type": "object" }, "output": { "type": "object" } },
        "required": ["input"],
    });
    let mut extension = serde_json::json!({ "info": info, "schema": schema });
    if let Some(template) = crate::discovery::RouteTemplate::of(pattern) {
        template.annotate(&mut extension);
    }
    Some(Bazaar { extension, output_schema_v1 })
}

fn payment_mode(key: &str, raw: &str) -> Result<PaymentMode, ConfigError> {
    match raw {
        "enforce" => Ok(PaymentMode::Enforce),
        "shadow" => Ok(PaymentMode::Shadow),
        other => Err(ConfigError::invalid(key, format!("`{other}`: expected \"enforce\" or \"shadow\""))),
    }
}

/// `settle_batch_max` above 1 turns batching on; the window alone is an error, since it would do nothing.
fn settle_batch(payment: Option<&file::Payment>) -> Result<Option<BatchSettings>, ConfigError> {
    let max = super::nonzero("payment.settle_batch_max", payment.and_then(|p| p.settle_batch_max))?;
    let window_ms = super::nonzero("payment.settle_batch_window_ms", payment.and_then(|p| p.settle_batch_window_ms))?;
    match (max, window_ms) {
        (Some(max), _) if max > MAX_SETTLE_BATCH => Err(ConfigError::invalid(
            "payment.settle_batch_max",
            format!("at most {MAX_SETTLE_BATCH} payments fit in one settlement transaction"),
        )),
        (_, Some(window_ms)) if window_ms > MAX_SETTLE_BATCH_WINDOW_MS => Err(ConfigError::invalid(
            "payment.settle_batch_window_ms",
            format!("at most {MAX_SETTLE_BATCH_WINDOW_MS} ms: a payment must have time to land after waiting"),
        )),
        (Some(max), window_ms) if max > 1 => Ok(Some(BatchSettings {
            max,
            window: window_ms.map_or(DEFAULT_SETTLE_BATCH_WINDOW, Duration::from_millis),
        })),
        (_, Some(_)) => Err(ConfigError::invalid(
            "payment.settle_batch_window_ms",
            "batching is off: set `settle_batch_max` above 1 to settle several payments per transaction",
        )),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;
    use std::path::Path;

    const KEY: &str = "sk-facilitator-3f9a";

    /// A paid route `/paid`, with `payment` and `route` lines added to `[payment]` and to the route.
    fn parse(payment: &str, route: &str) -> Result<Config, String> {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.api]\nurl = \"http://127.0.0.1:9\"\n\
             [payment]\npay_to = \"0x1111111111111111111111111111111111111111\"\nnetwork = \"eip155:84532\"\n\
             asset = \"USDC\"\n{payment}\n[[routes]]\npath = \"/paid\"\nupstream = \"api\"\namount = \"1000\"\n{route}\n"
        );
        let env = |name: &str| (name == "KEY").then(|| KEY.to_string());
        Config::parse(&toml, Path::new("gateway.toml"), Path::new("."), &env).map_err(|e| e.to_string())
    }

    fn facilitators(config: &Config) -> &[RemoteConfig] {
        match &config.routes[0].payment.as_ref().expect("a paid route").facilitator {
            FacilitatorChoice::Remote(set) => &set.facilitators,
            FacilitatorChoice::Local => panic!("local"),
        }
    }

    #[test]
    fn one_facilitator_url_is_a_list_of_one_with_facilitator_auth() {
        let config =
            parse("facilitator = \"https://f.example/v2/\"\nfacilitator_auth = \"Bearer ${KEY}\"", "").expect("valid");
        let [only] = facilitators(&config) else { panic!("one facilitator") };
        assert_eq!(only.url, "https://f.example/v2");
        assert_eq!(only.weight, 1);
        let auth = only.auth.as_ref().expect("facilitator_auth");
        assert_eq!(auth, &format!("Bearer {KEY}"));
        assert!(auth.is_sensitive());
        // A route's own URL still takes [payment]'s auth; `local` there settles in-process.
        let config = parse("facilitator_auth = \"${KEY}\"", "facilitator = \"https://other.example\"").expect("valid");
        assert_eq!(facilitators(&config)[0].auth.as_ref().expect("auth"), KEY);
        let local = "[networks.\"eip155:84532\"]\nrpc_url = \"http://127.0.0.1:9\"\n\
                     settler_key = \"0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a\"";
        let config = parse("facilitator = \"https://f.example\"", &format!("facilitator = \"local\"\n{local}"));
        assert!(matches!(
            config.expect("valid").routes[0].payment.as_ref().unwrap().facilitator,
            FacilitatorChoice::Local
        ));
    }

    #[test]
    fn a_list_of_facilitators_with_auth_and_weights_and_the_routes_own_list_first() {
        let list = "facilitators = [{ url = \"https://a.example/${KEY}\", auth = \"Bearer ${KEY}\", weight = 3 }, \
                    { url = \"http://b.example:8080\" }]";
        let config = parse(list, "").expect("valid");
        let [a, b] = facilitators(&config) else { panic!("two facilitators") };
        assert_eq!((a.url.as_str(), a.weight), (format!("https://a.example/{KEY}").as_str(), 3));
        assert!(a.auth.as_ref().is_some_and(|auth| auth.is_sensitive()));
        assert_eq!((b.url.as_str(), b.weight, b.auth.is_none()), ("http://b.example:8080", 1, true));
        let shown = format!("{config:?}");
        assert!(!shown.contains(KEY), "no key in Debug: {shown}");
        let config = parse(list, "facilitators = [{ url = \"https://route.example\" }]").expect("valid");
        let [own] = facilitators(&config) else { panic!("the route's own") };
        assert_eq!(own.url, "https://route.example");
    }

    #[test]
    fn a_bad_list_of_facilitators_is_refused_naming_the_key_never_the_url() {
        let refused = [
            ("facilitators = []", "", "payment.facilitators: an empty list"),
            (
                "facilitators = [{ url = \"https://a.example/${KEY}\" }, { url = \"https://a.example/${KEY}/\" }]",
                "",
                "payment.facilitators[1].url: the same facilitator as payment.facilitators[0]",
            ),
            (
                "facilitators = [{ url = \"https://a.example\", weight = 0 }]",
                "",
                "payment.facilitators[0].weight: must be greater than zero",
            ),
            (
                "facilitators = [{ url = \"ftp://a.example/${KEY}\" }]",
                "",
                "payment.facilitators[0].url: an http(s) facilitator URL",
            ),
            (
                "facilitators = [{ url = \"local\" }]",
                "",
                "payment.facilitators[0].url: \"local\" is not a remote facilitator",
            ),
            ("facilitators = [{ url = \"https://a.example\", key = \"x\" }]", "", "unknown field `key`"),
            (
                "",
                "facilitator = \"https://a.example\"\nfacilitators = [{ url = \"https://b.example\" }]",
                "routes[0].facilitators: set `facilitator` or `facilitators`, not both",
            ),
            (
                "",
                "facilitators = [{ url = \"https://a.example\", auth = \"bad\\nvalue ${KEY}\" }]",
                "routes[0].facilitators[0].auth: not a valid header value",
            ),
            ("facilitator = \"not a url ${KEY}\"", "", "payment.facilitator: \"local\" or an http(s) facilitator URL"),
            (
                "facilitator = \"https://a.example\"\nfacilitator_max_concurrency = 0",
                "",
                "payment.facilitator_max_concurrency: must be greater than zero",
            ),
            (
                "facilitator = \"https://a.example\"\nfacilitator_max_concurrency = 100000",
                "",
                "payment.facilitator_max_concurrency: at most 4096",
            ),
        ];
        for (payment, route, expected) in refused {
            let err = parse(payment, route).map(|_| ()).expect_err(expected);
            assert!(err.contains(expected), "{expected:?} in {err:?}");
            assert!(!err.contains(KEY), "no key in {err:?}");
        }
    }
}

#[cfg(test)]
mod per_token_tests {
    use crate::config::{Config, ConfigError};
    use crate::pricing::Pricing;
    use alloy::primitives::U256;
    use std::path::Path;

    fn parse(payment: &str, price: &str) -> Result<Config, ConfigError> {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.api]\nurl = \"http://127.0.0.1:9\"\n[payment]\n\
             pay_to = \"0x90F79bf6EB2c4f870365E785982E1f101E93b906\"\nnetwork = \"eip155:84532\"\nasset = \"USDC\"\n\
             facilitator = \"http://127.0.0.1:9\"\n{payment}\n[[routes]]\npath = \"/chat\"\nupstream = \"api\"\nprice = {price}\n"
        );
        Config::parse(&toml, Path::new("t.toml"), Path::new("."), &|_| None)
    }

    fn refused(payment: &str, price: &str) -> String {
        match parse(payment, price) {
            Err(err) => err.to_string(),
            Ok(_) => panic!("accepted: {price}"),
        }
    }

    #[test]
    fn a_per_token_price_makes_upto_offers_capped_at_max() {
        let config =
            parse("", r#"{ by = "body.model", per_token = { "m" = { input = "$0.15/1M", output = "$0.60/1M" } } }"#)
                .unwrap();
        let paid = config.routes[0].payment.as_ref().unwrap();
        let Pricing::PerToken(metering) = &paid.pricing else { panic!("per-token pricing") };
        assert_eq!(metering.offers[0].amount, U256::from(500_000), "the default max, $0.50");
        assert_eq!(metering.offers[0].scheme.name(), "upto");
        assert_eq!(metering.models[0].0, "m");
        assert_eq!(metering.models[0].1[0].cost(1_000_000, 1_000_000), U256::from(150_000 + 600_000));
        // A [payment]-wide "before" is for the other routes.
        let before = parse(
            "settle = \"before\"",
            r#"{ by = "body.model", per_token = { "m" = { input = "$1/1M", output = "$1/1M" } } }"#,
        );
        assert_eq!(before.unwrap().routes[0].payment.as_ref().unwrap().settle, crate::settlement::SettleMode::After);
    }

    #[test]
    fn per_token_mistakes_name_their_key() {
        let rates = r#"per_token = { "m" = { input = "$1/1M", output = "$2/1M" } }"#;
        let cases = [
            (format!(r#"{{ by = "body.model", {rates}, table = {{ a = "$1" }} }}"#), "routes[0].price.table"),
            (format!(r#"{{ by = "query.model", {rates} }}"#), "routes[0].price.by"),
            (r#"{ by = "body.model", per_token = {} }"#.to_string(), "routes[0].price.per_token"),
            (
                r#"{ by = "body.model", per_token = { "m" = { input = "0.1", output = "$1" } } }"#.to_string(),
                "routes[0].price.per_token.\"m\".input",
            ),
            (
                r#"{ by = "body.model", per_token = { "m" = { input = "$0", output = "$0" } } }"#.to_string(),
                "routes[0].price.per_token.\"m\"",
            ),
            (
                format!(r#"{{ by = "body.model", {rates}, inject_max_tokens = "max_tokens" }}"#),
                "routes[0].price.inject_max_tokens",
            ),
            (
                format!(r#"{{ by = "body.model", {rates}, default_max_tokens = 9, inject_max_tokens = "tokens" }}"#),
                "routes[0].price.inject_max_tokens",
            ),
            (
                format!(r#"{{ by = "body.model", {rates}, default_max_tokens = 0 }}"#),
                "routes[0].price.default_max_tokens",
            ),
            (format!(r#"{{ by = "body.model", {rates}, max = "1 dollar" }}"#), "routes[0].price.max"),
            (r#"{ by = "body.model", table = { a = "$1" }, max = "$1" }"#.to_string(), "routes[0].price.max"),
        ];
        for (price, key) in cases {
            let message = refused("", &price);
            assert!(message.contains(key), "{price}: {message}");
        }
        let route_before = format!(r#"{{ by = "body.model", {rates} }}"#);
        let toml_before = refused("", &format!("{route_before}\nsettle = \"before\""));
        assert!(toml_before.contains("routes[0].settle"), "{toml_before}");
    }
}
