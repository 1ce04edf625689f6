//! Prices: what a seller writes (`"$0.001"` or atomic units) and the offers a paid route makes.

pub use x402_proto::Offer;

use crate::metering::{Meter, ModelRates, TOKEN_LIMIT_FIELDS};
use alloy::primitives::{Address, U256};
use std::borrow::Cow;

/// A price as configured, before it meets an asset's decimals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Price {
    /// `"$0.001"`: US dollars, converted with the asset's decimals (stablecoins are taken at par).
    Usd(String),
    /// `"1000"`: atomic units of the asset.
    Atomic(U256),
}

impl Price {
    pub fn atomic(&self, decimals: u8) -> Result<U256, String> {
        let amount = match self {
            Price::Atomic(amount) => *amount,
            Price::Usd(text) => usd_to_atomic(text, decimals)?,
        };
        if amount.is_zero() {
            return Err("a price must be greater than zero (omit it for a free route)".into());
        }
        Ok(amount)
    }
}

/// `"$1.25"` with 6 decimals → 1250000, exactly (no floating point); more precision than the asset has is refused.
fn usd_to_atomic(text: &str, decimals: u8) -> Result<U256, String> {
    let digits = text
        .trim()
        .strip_prefix('$')
        .ok_or_else(|| format!("`{text}`: a price is written in dollars, such as \"$0.001\""))?;
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let is_number = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !is_number(whole) || !is_number(fraction) {
        return Err(format!("`{text}` is not a dollar amount such as \"$0.001\""));
    }
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > usize::from(decimals) {
        return Err(format!("`{text}` is more precise than the asset's {decimals} decimals"));
    }
    let padded = format!("{whole}{fraction:0<width$}", width = usize::from(decimals));
    U256::from_str_radix(if padded.is_empty() { "0" } else { &padded }, 10)
        .map_err(|_| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(text: &str, decimals: u8) -> Result<U256, String> {
        Price::Usd(text.into()).atomic(decimals)
    }

    #[test]
    fn dollars_to_atomic_units() {
        assert_eq!(usd("$0.001", 6).unwrap(), U256::from(1000));
        assert_eq!(usd("$1", 6).unwrap(), U256::from(1_000_000));
        assert_eq!(usd("$1.50", 6).unwrap(), U256::from(1_500_000));
        assert_eq!(usd("$.5", 2).unwrap(), U256::from(50));
        assert_eq!(usd("$0.02", 18).unwrap(), U256::from(20_000_000_000_000_000u64));
    }

    #[test]
    fn refused_prices() {
        for bad in ["0.001", "$", "$-1", "$1e3", "$0.0000001", "$0", "$1.2.3"] {
            assert!(usd(bad, 6).is_err(), "{bad}");
        }
        assert!(Price::Atomic(U256::ZERO).atomic(6).is_err());
    }
}

/// The most completions (`n`) one per-token request may ask for.
const MAX_CHOICES: u64 = 128;

/// How a paid route is priced: one set of offers, or a set chosen by a value of the request
/// (`by = "body.model"`, `"query.NAME"`, `"header.NAME"`). Every table entry's offers are built at load.
#[derive(Debug)]
pub enum Pricing {
    Fixed(Vec<Offer>),
    ByRequest(PriceTable),
    /// `upto` offers whose ceiling each request's size and token limit set, charged by the answer's usage.
    PerToken(Metering),
}

#[derive(Debug)]
pub struct PriceTable {
    pub source: PriceSource,
    /// In the configuration's order.
    pub table: Vec<(String, Vec<Offer>)>,
    pub default: Option<Vec<Offer>>,
}

/// How an `upto` route is priced: a model's rates, chosen by a value of the request, and a cap.
#[derive(Debug)]
pub struct Metering {
    /// Where the model is read (`body.model`).
    pub source: PriceSource,
    /// The route's offers, with `amount` the route's `max` (the most any request may cost); a request's
    /// offers are these with its own ceiling.
    pub offers: Vec<Offer>,
    /// By model, one set of rates for each offer, in the offers' order.
    pub models: Vec<(String, Vec<ModelRates>)>,
    /// The completion bound of a request that sets no token limit.
    pub default_max_tokens: Option<u64>,
    /// The field to write `default_max_tokens` into, in the forwarded body of a request that sets no limit.
    pub inject_max_tokens: Option<String>,
    /// Whether a stream that does not ask for its usage is made to (`stream_options.include_usage`, OpenAI).
    pub inject_stream_usage: bool,
    /// The prices as the operator wrote them, which catalogues, discovery and `check` show.
    pub written: WrittenPrices,
}

/// A per-token route's prices as configured (`"$0.15/1M"`, `"$0.50"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenPrices {
    /// `max`, or the default cap when the route sets none.
    pub max: String,
    /// Each model's `(input, output)` rates, in `Metering::models`' order.
    pub rates: Vec<(String, String)>,
}

/// One model of a per-token route as catalogues, discovery and `check` list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedModel<'a> {
    pub model: &'a str,
    /// The rates as configured.
    pub input: &'a str,
    pub output: &'a str,
    /// In each offer's asset, in the offers' order: what a million prompt and a million completion tokens
    /// cost, in atomic units (rounded up, as every charge is).
    pub per_million: Vec<(U256, U256)>,
}

impl Metering {
    /// Every model the route sells, in the configuration's order.
    pub fn listed(&self) -> Vec<ListedModel<'_>> {
        const MILLION: u64 = 1_000_000;
        self.models
            .iter()
            .zip(&self.written.rates)
            .map(|((model, rates), (input, output))| ListedModel {
                model,
                input,
                output,
                per_million: rates.iter().map(|r| (r.cost(MILLION, 0), r.cost(0, MILLION))).collect(),
            })
            .collect()
    }

    /// Reads the model and the token limit of a request (`body` is its JSON body).
    pub fn meter(&self, query: Option<&str>, headers: &http::HeaderMap, body: &[u8]) -> Result<Meter, PriceError> {
        let model = self.source.read(query, headers, body)?;
        let Some((model, rates)) = model.as_deref().and_then(|m| self.models.iter().find(|(name, _)| name == m)) else {
            return Err(PriceError::Unknown {
                rule: self.source.describe(),
                shown: model.map_or("missing".to_string(), |v| format!("`{v}`")),
                allowed: self.models.iter().map(|(name, _)| name.clone()).collect(),
            });
        };
        let mut limit: Option<u64> = None;
        for field in TOKEN_LIMIT_FIELDS {
            let source = PriceSource::Body(vec![field.to_string()]);
            let Some(value) = source.read(None, headers, body)? else { continue };
            let tokens = value.parse::<u64>().map_err(|_| PriceError::TokenLimit(field))?;
            limit = Some(limit.map_or(tokens, |l| l.max(tokens)));
        }
        // `n` completions of up to the limit each (OpenAI chat).
        let choices = match PriceSource::Body(vec!["n".to_string()]).read(None, headers, body)? {
            None => 1,
            Some(n) => {
                n.parse::<u64>().ok().filter(|n| (1..=MAX_CHOICES).contains(n)).ok_or(PriceError::TokenLimit("n"))?
            }
        };
        let inject = match (limit, &self.inject_max_tokens, self.default_max_tokens) {
            (None, Some(field), Some(default)) => Some((field.clone(), default)),
            _ => None,
        };
        let read =
            |path: &[&str]| PriceSource::Body(path.iter().map(|s| s.to_string()).collect()).read(None, headers, body);
        let streams = read(&["stream"])?.as_deref() == Some("true");
        let asks_usage = read(&["stream_options", "include_usage"])?.as_deref() == Some("true");
        let include_usage = self.inject_stream_usage && streams && !asks_usage;
        Ok(Meter {
            model: model.clone(),
            rates: rates.clone(),
            prompt_bound: u64::try_from(body.len()).unwrap_or(u64::MAX),
            completion_bound: limit.or(self.default_max_tokens).map(|tokens| tokens.saturating_mul(choices)),
            inject,
            include_usage,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceSource {
    /// A path into the JSON body: `body.a.b` → `["a", "b"]`.
    Body(Vec<String>),
    Query(String),
    Header(http::HeaderName),
}

/// The offers for one request, and the value that chose them (the model, say).
pub struct Priced<'a> {
    /// Borrowed from the configuration, or made for this request (`upto` ceilings).
    pub offers: Cow<'a, [Offer]>,
    pub key: Option<String>,
    /// How the answer is charged, on a per-token route.
    pub meter: Option<Meter>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("the request body must be JSON: its `{0}` sets the price")]
    NotJson(String),
    #[error("{0} is sent more than once; the price depends on it, so it must be unambiguous")]
    Ambiguous(String),
    #[error("{rule} is {shown}; this route sells: {}", allowed.join(", "))]
    Unknown { rule: String, shown: String, allowed: Vec<String> },
    #[error("`{0}` must be a whole number of tokens: this route charges by the token")]
    TokenLimit(&'static str),
    /// The facilitator's address, which `upto` offers name, is not known yet.
    #[error("this route's facilitator has not announced its `upto` signer yet; retry shortly")]
    NoUptoSigner,
}

impl PriceSource {
    pub fn parse(text: &str) -> Result<PriceSource, String> {
        let bad = || format!("`{text}`: expected \"body.FIELD[.FIELD...]\", \"query.NAME\" or \"header.NAME\"");
        let (kind, rest) = text.split_once('.').ok_or_else(bad)?;
        match kind {
            "body" if rest.split('.').all(|s| !s.is_empty()) => {
                Ok(PriceSource::Body(rest.split('.').map(str::to_string).collect()))
            }
            "query" if !rest.is_empty() => Ok(PriceSource::Query(rest.to_string())),
            "header" => http::HeaderName::from_bytes(rest.as_bytes()).map(PriceSource::Header).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PriceSource::Body(path) => format!("body.{}", path.join(".")),
            PriceSource::Query(name) => format!("query.{name}"),
            PriceSource::Header(name) => format!("header.{name}"),
        }
    }

    /// The request's value for this source; `Err` only when a body rule meets a body that is not JSON.
    pub(crate) fn read(
        &self,
        query: Option<&str>,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Result<Option<String>, PriceError> {
        Ok(match self {
            PriceSource::Body(path) => {
                let found = body_value(body, path).map_err(|_| PriceError::NotJson(self.describe()))?;
                match found {
                    Found::Ambiguous => return Err(PriceError::Ambiguous(self.describe())),
                    Found::Value(serde_json::Value::String(s)) => Some(s),
                    Found::Value(serde_json::Value::Null) | Found::Missing => None,
                    Found::Value(other) => Some(other.to_string()),
                }
            }
            // The upstream may read another copy than the first, or match names regardless of case: a repeated
            // or re-cased key could buy the dear with the cheap.
            PriceSource::Query(name) => {
                let mut values =
                    form_urlencoded::parse(query.unwrap_or("").as_bytes()).filter(|(k, _)| same_key(k, name));
                let first = values.next();
                if values.next().is_some() || first.as_ref().is_some_and(|(k, _)| k != name) {
                    return Err(PriceError::Ambiguous(self.describe()));
                }
                first.map(|(_, v)| v.into_owned())
            }
            PriceSource::Header(name) => {
                if headers.get_all(name).iter().count() > 1 {
                    return Err(PriceError::Ambiguous(self.describe()));
                }
                headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
            }
        })
    }
}

/// Whether two keys could be the same one to some upstream: Go's `encoding/json` and ASP.NET match names
/// regardless of case (Unicode folding: `ſ` is `s`, the Kelvin sign `k`).
fn same_key(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    let fold = |s: &str| -> String {
        s.chars().flat_map(char::to_lowercase).map(|c| if c == '\u{17f}' { 's' } else { c }).collect()
    };
    fold(a) == fold(b)
}

/// What a JSON path leads to in a body.
#[derive(Debug, PartialEq)]
enum Found {
    Missing,
    Value(serde_json::Value),
    /// A key on the path is there more than once, or in another letter case: parsers disagree on which copy
    /// counts (serde_json and JavaScript keep the last, others the first or any case-insensitive match).
    Ambiguous,
}

/// The value at `path` in the JSON `body`, which must be one valid JSON document.
fn body_value(body: &[u8], path: &[String]) -> Result<Found, serde_json::Error> {
    let mut reader = serde_json::Deserializer::from_slice(body);
    let found = serde::de::DeserializeSeed::deserialize(PathSeed(path), &mut reader)?;
    reader.end()?;
    Ok(found)
}

/// Reads a JSON value, keeping only what lies at the path, and every key on the path that could be confused.
struct PathSeed<'p>(&'p [String]);

impl<'de> serde::de::DeserializeSeed<'de> for PathSeed<'_> {
    type Value = Found;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Found, D::Error> {
        match self.0.split_first() {
            None => serde::Deserialize::deserialize(deserializer).map(Found::Value),
            Some((field, rest)) => deserializer.deserialize_any(PathVisitor { field, rest }),
        }
    }
}

struct PathVisitor<'p> {
    field: &'p str,
    rest: &'p [String],
}

impl<'de> serde::de::Visitor<'de> for PathVisitor<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let (mut found, mut copies) = (Found::Missing, 0);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if !same_key(&key, self.field) {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            copies += 1;
            let value = map.next_value_seed(PathSeed(self.rest))?;
            found = if copies == 1 && key == self.field { value } else { Found::Ambiguous };
        }
        Ok(found)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Found, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Found::Missing)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Found, E> {
        Ok(Found::Missing)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Found, E> {
        Ok(Found::Missing)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Found, E> {
        Ok(Found::Missing)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Found, E> {
        Ok(Found::Missing)
    }

    fn visit_str<E>(self, _: &str) -> Result<Found, E> {
        Ok(Found::Missing)
    }

    fn visit_unit<E>(self) -> Result<Found, E> {
        Ok(Found::Missing)
    }
}

impl Pricing {
    pub fn needs_body(&self) -> bool {
        matches!(self, Pricing::ByRequest(PriceTable { source: PriceSource::Body(_), .. }) | Pricing::PerToken(_))
    }

    /// The offers for this request. `upto_signer` gives the address a network's `upto` offers must name (the
    /// facilitator that settles them).
    pub fn price<'a>(
        &'a self,
        query: Option<&str>,
        headers: &http::HeaderMap,
        body: &[u8],
        upto_signer: impl Fn(u64) -> Option<Address>,
    ) -> Result<Priced<'a>, PriceError> {
        let table = match self {
            Pricing::Fixed(offers) => return Ok(Priced { offers: Cow::Borrowed(offers), key: None, meter: None }),
            Pricing::ByRequest(table) => table,
            Pricing::PerToken(metering) => {
                let meter = metering.meter(query, headers, body)?;
                let offers = metering
                    .offers
                    .iter()
                    .enumerate()
                    .map(|(index, template)| {
                        let facilitator = upto_signer(template.network.chain_id).ok_or(PriceError::NoUptoSigner)?;
                        Ok(template.upto(meter.ceiling(index, template.amount), facilitator))
                    })
                    .collect::<Result<Vec<_>, PriceError>>()?;
                let key = Some(meter.model.clone());
                return Ok(Priced { offers: Cow::Owned(offers), key, meter: Some(meter) });
            }
        };
        let value = table.source.read(query, headers, body)?;
        let listed = value.as_deref().and_then(|v| table.table.iter().find(|(key, _)| key == v));
        match (listed, &table.default) {
            (Some((key, offers)), _) => {
                Ok(Priced { offers: Cow::Borrowed(offers), key: Some(key.clone()), meter: None })
            }
            (None, Some(offers)) => Ok(Priced { offers: Cow::Borrowed(offers), key: value, meter: None }),
            (None, None) => Err(PriceError::Unknown {
                rule: table.source.describe(),
                shown: value.map_or("missing".to_string(), |v| format!("`{v}`")),
                allowed: table.table.iter().map(|(key, _)| key.clone()).collect(),
            }),
        }
    }

    /// Every set of offers the route can make, with the value that selects it (`None`: fixed or default). A
    /// per-token route's are its offers at their cap (`max`), by model.
    pub fn all_offers(&self) -> Vec<(Option<&str>, &[Offer])> {
        match self {
            Pricing::Fixed(offers) => vec![(None, offers.as_slice())],
            Pricing::PerToken(metering) => {
                metering.models.iter().map(|(model, _)| (Some(model.as_str()), metering.offers.as_slice())).collect()
            }
            Pricing::ByRequest(table) => table
                .table
                .iter()
                .map(|(key, offers)| (Some(key.as_str()), offers.as_slice()))
                .chain(table.default.iter().map(|offers| (None, offers.as_slice())))
                .collect(),
        }
    }
}

#[cfg(test)]
mod rule_tests {
    use super::*;

    #[test]
    fn price_sources() {
        assert_eq!(PriceSource::parse("body.model"), Ok(PriceSource::Body(vec!["model".into()])));
        assert_eq!(PriceSource::parse("body.a.b"), Ok(PriceSource::Body(vec!["a".into(), "b".into()])));
        assert_eq!(PriceSource::parse("query.tier"), Ok(PriceSource::Query("tier".into())));
        assert!(matches!(PriceSource::parse("header.x-tier"), Ok(PriceSource::Header(_))));
        for bad in ["model", "body.", "body.a..b", "query.", "cookie.x", "header.bad header"] {
            assert!(PriceSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_are_read_from_each_source() {
        let headers = http::HeaderMap::from_iter([(http::HeaderName::from_static("x-tier"), "gold".parse().unwrap())]);
        let body = br#"{"a":{"b":"deep"},"n":7}"#;
        let read = |source: &str| PriceSource::parse(source).unwrap().read(Some("tier=silver&x=1"), &headers, body);
        assert_eq!(read("body.a.b"), Ok(Some("deep".into())));
        assert_eq!(read("body.n"), Ok(Some("7".into())));
        assert_eq!(read("body.missing"), Ok(None));
        assert_eq!(read("query.tier"), Ok(Some("silver".into())));
        assert_eq!(read("header.x-tier"), Ok(Some("gold".into())));
        let twice = PriceSource::parse("query.tier").unwrap().read(Some("tier=cheap&tier=dear"), &headers, body);
        assert_eq!(twice, Err(PriceError::Ambiguous("query.tier".into())));
        let not_json = PriceSource::parse("body.model").unwrap().read(None, &headers, b"model=x");
        assert_eq!(not_json, Err(PriceError::NotJson("body.model".into())));
    }

    #[test]
    fn a_priced_key_that_parsers_could_read_differently_is_ambiguous() {
        let headers = http::HeaderMap::new();
        let body = |json: &str| PriceSource::parse("body.a.model").unwrap().read(None, &headers, json.as_bytes());
        let ambiguous = Err(PriceError::Ambiguous("body.a.model".into()));
        assert_eq!(body(r#"{"a":{"model":"cheap","model":"dear"}}"#), ambiguous);
        assert_eq!(body(r#"{"a":{"model":"cheap","MODEL":"dear"}}"#), ambiguous);
        assert_eq!(body(r#"{"a":{"Model":"dear"}}"#), ambiguous, "a lone re-cased key");
        assert_eq!(body(r#"{"a":{"model":"cheap","mode\u017fl":"x","\u017fmodel":1}}"#), Ok(Some("cheap".into())));
        assert_eq!(body(r#"{"a":{"model":"cheap"},"A":{"model":"dear"}}"#), ambiguous, "on the way there too");
        assert_eq!(body(r#"{"a":{"model":"cheap","mod\u0065l":"dear"}}"#), ambiguous, "an escaped copy");
        assert_eq!(
            body(r#"{"a":{"model":"cheap","other":{"model":"x"}},"b":[{"model":1}]}"#),
            Ok(Some("cheap".into()))
        );
        assert_eq!(body(r#"{"a":[1,2],"x":null}"#), Ok(None));
        assert_eq!(body(r#"{"a":1,"a":{"model":"dear"}}"#), ambiguous, "a repeated key that led nowhere first");
        assert_eq!(body(r#"{"a":{"model":"x"}} trailing"#), Err(PriceError::NotJson("body.a.model".into())));
        let query = |q: &str| PriceSource::parse("query.tier").unwrap().read(Some(q), &headers, b"");
        assert_eq!(query("tier=cheap&TIER=dear"), Err(PriceError::Ambiguous("query.tier".into())));
        assert_eq!(query("Tier=dear"), Err(PriceError::Ambiguous("query.tier".into())));
        assert_eq!(query("tier=cheap&tiers=x"), Ok(Some("cheap".into())));
    }
}
