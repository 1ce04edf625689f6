//! Per-token billing for `upto` routes: the ceiling a request may cost, read from the request before it is
//! served, and the charge its answer's usage comes to, after. All arithmetic is exact, in atomic units, and
//! every fraction of an atomic unit is rounded up.
//!
//! The ceiling's bounds: the prompt cannot have more tokens than the request body has bytes (a tokenizer's
//! every token covers at least one byte of the text, and the JSON around the text only adds bytes), and the
//! completion cannot have more than the request's token limit (`max_tokens`, `max_completion_tokens`,
//! `max_output_tokens`; the route's `default_max_tokens` when it sets none). Inputs a body names but does not
//! carry (an image by URL) can cost more tokens than their bytes: the charge is capped at the ceiling whatever
//! the usage says, so the buyer never pays more than it signed for.

use crate::body::{full, Body};
use crate::usage::Usage;
use alloy::primitives::U256;

/// The token-limit fields of the OpenAI chat, OpenAI responses and Anthropic messages APIs.
pub const TOKEN_LIMIT_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];
/// Bytes of text per token assumed when an answer ends without its usage: typical of English with the
/// common tokenizers.
pub const ESTIMATED_BYTES_PER_TOKEN: u64 = 4;

/// A price per token, in atomic units of one asset: `numerator / denominator`, exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRate {
    numerator: U256,
    denominator: U256,
}

impl TokenRate {
    /// `"$0.15/1M"` (dollars per million tokens), `"$2/1K"`, `"$0.000002"` (per token), with `decimals` to the
    /// dollar. Any precision is kept: the rounding happens once, on the charge.
    pub fn parse(text: &str, decimals: u8) -> Result<TokenRate, String> {
        let bad =
            || format!("`{text}`: expected dollars per token count, such as \"$0.15/1M\", \"$2/1K\" or \"$0.000002\"");
        let (price, per) = text.trim().split_once('/').unwrap_or((text.trim(), "1"));
        let digits = price.trim().strip_prefix('$').ok_or_else(bad)?;
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        let is_number = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !is_number(whole) || !is_number(fraction) {
            return Err(bad());
        }
        let per = match per.trim() {
            "1" => 1u64,
            "1K" | "1k" => 1_000,
            "1M" | "1m" => 1_000_000,
            other => other.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(bad)?,
        };
        let fraction_digits = u32::try_from(fraction.len()).map_err(|_| bad())?;
        let numerator = U256::from_str_radix(&format!("{whole}{fraction}"), 10).map_err(|_| bad())?;
        let scale = U256::from(10u64).checked_pow(U256::from(fraction_digits)).ok_or_else(bad)?;
        let numerator = numerator.checked_mul(U256::from(10u64).pow(U256::from(decimals))).ok_or_else(bad)?;
        let denominator = scale.checked_mul(U256::from(per)).ok_or_else(bad)?;
        Ok(TokenRate { numerator, denominator })
    }

    pub fn is_zero(&self) -> bool {
        self.numerator.is_zero()
    }
}

/// A model's prices, in one offer's asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelRates {
    pub input: TokenRate,
    pub output: TokenRate,
}

impl ModelRates {
    /// `prompt` and `completion` tokens at these rates, rounded up to the next atomic unit; saturates.
    pub fn cost(&self, prompt: u64, completion: u64) -> U256 {
        let (a, b) = (self.input, self.output);
        let part = |tokens: u64, rate: TokenRate, other: TokenRate| {
            U256::from(tokens).saturating_mul(rate.numerator).saturating_mul(other.denominator)
        };
        let numerator = part(prompt, a, b).saturating_add(part(completion, b, a));
        let denominator = a.denominator.saturating_mul(b.denominator);
        numerator.div_ceil(denominator)
    }
}

/// What a request may cost at most, and how its answer will be charged.
#[derive(Debug, Clone)]
pub struct Meter {
    pub model: String,
    /// Its rates for each of the route's offers, in their order.
    pub rates: Vec<ModelRates>,
    /// The prompt bound: the request body's size.
    pub prompt_bound: u64,
    /// The completion bound; `None`: unbounded but for the route's `max`.
    pub completion_bound: Option<u64>,
    /// The token limit to write into the forwarded body, when the operator asks for it.
    pub inject: Option<(String, u64)>,
    /// Whether to ask the upstream for the stream's usage in the forwarded body, when the operator asks for it.
    pub include_usage: bool,
}

impl Meter {
    /// The ceiling for the route's offer `index` whose cap is `max`: never above the cap, never 0.
    pub fn ceiling(&self, index: usize, max: U256) -> U256 {
        let Some(rates) = self.rates.get(index) else { return max };
        let Some(completion) = self.completion_bound else { return max };
        rates.cost(self.prompt_bound, completion).clamp(U256::from(1), max)
    }
}

/// `request` with what `meter` writes into its JSON body (`body`, as read for pricing): the route's token limit
/// where it sets none, and `stream_options.include_usage` for a stream, so that the upstream stops where the
/// ceiling assumed and reports what it used. A body that is not a JSON object goes on as it was.
pub fn rewrite_body(request: http::Request<Body>, body: &[u8], meter: &Meter) -> http::Request<Body> {
    if meter.inject.is_none() && !meter.include_usage {
        return request;
    }
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return request;
    };
    if let Some((field, tokens)) = &meter.inject {
        object.insert(field.clone(), (*tokens).into());
    }
    if meter.include_usage {
        let options = object.entry("stream_options").or_insert_with(|| serde_json::json!({}));
        match options.as_object_mut() {
            Some(options) => {
                options.insert("include_usage".into(), true.into());
            }
            // Not an object: the upstream would refuse it anyway, so it is left for the upstream to refuse.
            None => return request,
        }
    }
    let Ok(written) = serde_json::to_vec(&object) else { return request };
    let (mut parts, _) = request.into_parts();
    parts.headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(written.len()));
    http::Request::from_parts(parts, full(written))
}

/// What an answer showed of its cost once it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measured {
    pub usage: Option<Usage>,
    /// Bytes of generated text seen (SSE deltas), or of the whole answer when it is not a stream.
    pub content_bytes: u64,
    /// Whether the answer ended, rather than broke or lost its buyer half-way.
    pub complete: bool,
}

/// How a charge was arrived at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeBasis {
    /// The upstream's `Settlement-Overrides`.
    Override,
    /// The answer's own usage.
    Usage,
    /// Estimated from the bytes delivered: the answer ended without its usage.
    Estimate,
    /// Nothing was delivered.
    Nothing,
}

impl ChargeBasis {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeBasis::Override => "override",
            ChargeBasis::Usage => "usage",
            ChargeBasis::Estimate => "estimate",
            ChargeBasis::Nothing => "nothing",
        }
    }
}

/// What an answer costs under `rates`, capped at `ceiling`: the usage when it arrived; else an estimate from
/// the bytes (`prompt_bytes` of request, `content_bytes` of answer, [`ESTIMATED_BYTES_PER_TOKEN`] each);
/// nothing for an answer with no content. An answer cut short after an early usage (Anthropic reports its
/// input before the text) is charged at least the estimate of the text it delivered.
pub fn charge(rates: &ModelRates, measured: &Measured, prompt_bytes: u64, ceiling: U256) -> (U256, ChargeBasis) {
    let tokens = |bytes: u64| bytes.div_ceil(ESTIMATED_BYTES_PER_TOKEN);
    let delivered = tokens(measured.content_bytes);
    let (cost, basis) = match measured.usage {
        Some(usage) if measured.complete || usage.completion_tokens >= delivered => {
            (rates.cost(usage.prompt_tokens, usage.completion_tokens), ChargeBasis::Usage)
        }
        Some(usage) => (rates.cost(usage.prompt_tokens, delivered), ChargeBasis::Estimate),
        None if measured.content_bytes == 0 => (U256::ZERO, ChargeBasis::Nothing),
        None => (rates.cost(tokens(prompt_bytes), delivered), ChargeBasis::Estimate),
    };
    (cost.min(ceiling), basis)
}

/// The header an upstream sets to name the charge itself, as the reference middleware reads it. It never
/// leaves the gateway.
pub const SETTLEMENT_OVERRIDES: http::HeaderName = http::HeaderName::from_static("settlement-overrides");

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    #[error("`Settlement-Overrides` is not JSON with a string `amount`")]
    Malformed,
    #[error("`Settlement-Overrides` amount `{0}` is not atomic units, a percent (\"50%\") or dollars (\"$0.05\")")]
    Amount(String),
}

/// The charge an upstream's `Settlement-Overrides: {"amount": ...}` names: atomic units (`"1000"`), a percent
/// of the ceiling with up to two decimals, floored (`"33.33%"`), or dollars converted with `decimals`, rounded to
/// the nearest unit (`"$0.05"`). The caller caps it at the ceiling.
pub fn override_amount(value: &[u8], ceiling: U256, decimals: u8) -> Result<U256, OverrideError> {
    #[derive(serde::Deserialize)]
    struct Overrides {
        amount: String,
    }
    let overrides: Overrides = serde_json::from_slice(value).map_err(|_| OverrideError::Malformed)?;
    let text = overrides.amount.trim();
    let bad = || OverrideError::Amount(overrides.amount.clone());
    let is_number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(percent) = text.strip_suffix('%') {
        let (whole, fraction) = percent.split_once('.').unwrap_or((percent, ""));
        if !is_number(whole) || fraction.len() > 2 || !(fraction.is_empty() || is_number(fraction)) {
            return Err(bad());
        }
        let hundredths = U256::from_str_radix(&format!("{whole}{fraction:0<2}"), 10).map_err(|_| bad())?;
        return Ok(ceiling.saturating_mul(hundredths) / U256::from(10_000u64));
    }
    if let Some(dollars) = text.strip_prefix('$') {
        let (whole, fraction) = dollars.split_once('.').unwrap_or((dollars, ""));
        if !is_number(whole) || !(fraction.is_empty() || is_number(fraction)) {
            return Err(bad());
        }
        let places = usize::from(decimals);
        let (kept, dropped) = fraction.split_at(fraction.len().min(places));
        let units = U256::from_str_radix(&format!("{whole}{kept:0<places$}"), 10).map_err(|_| bad())?;
        let round_up = dropped.bytes().next().is_some_and(|digit| digit >= b'5');
        return Ok(if round_up { units.saturating_add(U256::from(1)) } else { units });
    }
    if is_number(text) {
        return U256::from_str_radix(text, 10).map_err(|_| bad());
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(input: &str, output: &str) -> ModelRates {
        ModelRates { input: TokenRate::parse(input, 6).unwrap(), output: TokenRate::parse(output, 6).unwrap() }
    }

    #[test]
    fn rates_are_exact_and_charges_round_up() {
        let mini = rates("$0.15/1M", "$0.60/1M");
        // 1,000 prompt tokens at $0.15/1M = 150 units; 500 completion at $0.60/1M = 300 units.
        assert_eq!(mini.cost(1000, 500), U256::from(450));
        // One token of each: 0.15 + 0.6 units, rounded up once, to 1.
        assert_eq!(mini.cost(1, 1), U256::from(1));
        assert_eq!(mini.cost(0, 0), U256::ZERO);
        assert_eq!(rates("$2/1K", "$0.000002").cost(3, 10), U256::from(6000 + 20));
        assert_eq!(rates("$0.0000001", "$0").cost(10, 0), U256::from(1), "a millionth of a unit is still charged");
        for bad in ["0.15/1M", "$0.15/2X", "$/1M", "$1/0", "$-1", "$1e3/1M", "$0.1.2"] {
            assert!(TokenRate::parse(bad, 6).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ceiling_is_capped_and_never_zero() {
        let meter = Meter {
            model: "m".into(),
            rates: vec![rates("$0.15/1M", "$0.60/1M")],
            prompt_bound: 2000,
            completion_bound: Some(1000),
            inject: None,
            include_usage: false,
        };
        assert_eq!(meter.ceiling(0, U256::from(500_000)), U256::from(300 + 600));
        assert_eq!(meter.ceiling(0, U256::from(700)), U256::from(700), "capped by the route's max");
        let unbounded = Meter { completion_bound: None, ..meter.clone() };
        assert_eq!(unbounded.ceiling(0, U256::from(500_000)), U256::from(500_000));
        let free = Meter { rates: vec![rates("$0", "$0")], ..meter };
        assert_eq!(free.ceiling(0, U256::from(500_000)), U256::from(1));
    }

    #[test]
    fn charges_come_from_usage_else_an_estimate_never_above_the_ceiling() {
        let r = rates("$1/1M", "$2/1M");
        let usage = Usage { prompt_tokens: 100, completion_tokens: 50 };
        let used = Measured { usage: Some(usage), content_bytes: 999, complete: true };
        assert_eq!(charge(&r, &used, 4000, U256::from(1000)), (U256::from(200), ChargeBasis::Usage));
        assert_eq!(charge(&r, &used, 4000, U256::from(150)), (U256::from(150), ChargeBasis::Usage));
        let cut = Measured { usage: None, content_bytes: 400, complete: false };
        // 4000 bytes of prompt ≈ 1000 tokens ($1/1M: 1000 units), 400 bytes ≈ 100 tokens ($2/1M: 200 units).
        assert_eq!(charge(&r, &cut, 4000, U256::from(5000)), (U256::from(1200), ChargeBasis::Estimate));
        let empty = Measured { usage: None, content_bytes: 0, complete: true };
        assert_eq!(charge(&r, &empty, 4000, U256::from(5000)), (U256::ZERO, ChargeBasis::Nothing));
        // Cut after an early usage (input tokens, one output token): the 400 bytes delivered count as 100 tokens.
        let early = Measured {
            usage: Some(Usage { prompt_tokens: 100, completion_tokens: 1 }),
            content_bytes: 400,
            complete: false,
        };
        assert_eq!(charge(&r, &early, 4000, U256::from(5000)), (U256::from(100 + 200), ChargeBasis::Estimate));
    }

    #[test]
    fn settlement_overrides_as_the_reference_reads_them() {
        let ceiling = U256::from(10_000);
        let read = |json: &str| override_amount(json.as_bytes(), ceiling, 6);
        assert_eq!(read(r#"{"amount":"1234"}"#), Ok(U256::from(1234)));
        assert_eq!(read(r#"{"amount":"50%"}"#), Ok(U256::from(5000)));
        assert_eq!(read(r#"{"amount":"33.33%"}"#), Ok(U256::from(3333)));
        assert_eq!(read(r#"{"amount":"0.015%"}"#), Err(OverrideError::Amount("0.015%".into())));
        assert_eq!(read(r#"{"amount":"$0.005"}"#), Ok(U256::from(5000)));
        assert_eq!(read(r#"{"amount":"$0.0000005"}"#), Ok(U256::from(1)), "rounded to the nearest unit");
        assert_eq!(read(r#"{"amount":"$0.0000004"}"#), Ok(U256::ZERO));
        assert_eq!(read(r#"{"amount":"999999"}"#), Ok(U256::from(999_999)), "the caller caps it");
        for bad in [r#"{"amount":"-1"}"#, r#"{"amount":"1e3"}"#, r#"{"amount":"$"}"#, r#"{"amount":"%"}"#] {
            assert!(matches!(read(bad), Err(OverrideError::Amount(_))), "{bad}");
        }
        for malformed in ["", "nope", r#"{"amount":5}"#, r#"{"other":"1"}"#] {
            assert_eq!(read(malformed), Err(OverrideError::Malformed), "{malformed}");
        }
    }
}
