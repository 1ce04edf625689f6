//! Validation of the payment side of `gateway.toml`: networks and assets, and each paid route's offers.

use super::file::{self, Terms};
use super::{ConfigError, Validator};
use crate::networks::{self, Asset, Network};
use crate::pricing::{Offer, Price};
use alloy::primitives::{Address, U256};
use std::collections::BTreeMap;

pub const DEFAULT_MAX_TIMEOUT_SECONDS: u64 = 300;
pub const DEFAULT_NONCE_CACHE_CAPACITY: u64 = 100_000;
const LOCAL_FACILITATOR: &str = "local";

/// What a paid route sells and for how much.
#[derive(Debug)]
pub struct PaidRoute {
    /// Deterministic order: the route's `accepts` order (or its single offer).
    pub offers: Vec<Offer>,
    pub description: String,
    pub mime_type: String,
}

/// Payment settings shared by all routes.
#[derive(Debug)]
pub struct PaymentSettings {
    /// How many authorizations may be reserved against replay at once.
    pub nonce_cache_capacity: u64,
    /// Every network the configuration knows: the built-in table with `[networks]` applied, by chain id.
    pub networks: BTreeMap<u64, Network>,
}

impl Validator<'_> {
    pub(super) fn payment_settings(
        &self,
        payment: Option<&file::Payment>,
        raw_networks: BTreeMap<String, file::Network>,
    ) -> Result<PaymentSettings, ConfigError> {
        let mut networks = BTreeMap::new();
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
                });
            }
            networks.insert(chain_id, network);
        }
        let capacity = super::nonzero("payment.nonce_cache_capacity", payment.and_then(|p| p.nonce_cache_capacity))?;
        Ok(PaymentSettings { nonce_cache_capacity: capacity.unwrap_or(DEFAULT_NONCE_CACHE_CAPACITY), networks })
    }

    /// The route's offers, or `None` for a free route (no price anywhere and no `accepts`).
    pub(super) fn paid_route(
        &self,
        key: &str,
        route: &file::Route,
        payment: Option<&file::Payment>,
        settings: &PaymentSettings,
    ) -> Result<Option<PaidRoute>, ConfigError> {
        let route_terms = route.terms();
        if route.accepts.is_empty() && route_terms.price.is_none() && route_terms.amount.is_none() {
            return Ok(None);
        }
        let facilitator = route.facilitator.as_deref().or(payment.and_then(|p| p.facilitator.as_deref()));
        if facilitator.is_some_and(|f| f != LOCAL_FACILITATOR) {
            return Err(ConfigError::invalid(
                format!("{key}.facilitator"),
                "only \"local\" (in-process verification) is supported in this version",
            ));
        }
        let defaults = route_terms.or(&payment.map(file::Payment::terms).unwrap_or_default());
        let entries: Vec<(String, Terms)> = if route.accepts.is_empty() {
            vec![(key.to_string(), defaults)]
        } else {
            route.accepts.iter().enumerate().map(|(i, t)| (format!("{key}.accepts[{i}]"), t.or(&defaults))).collect()
        };
        let offers = entries
            .iter()
            .map(|(entry_key, terms)| self.offer(entry_key, terms, settings))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(PaidRoute {
            offers,
            description: route.description.clone().unwrap_or_default(),
            mime_type: route.mime_type.clone().unwrap_or_default(),
        }))
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
        Ok(Offer { network, asset, pay_to, amount, max_timeout_seconds })
    }
}
