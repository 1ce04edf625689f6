//! Prices: what a seller writes (`"$0.001"` or atomic units) and the offers a paid route makes.

use crate::networks::{Asset, Network};
use alloy::primitives::{Address, U256};

/// One way to pay for a route: this amount of this asset on this network, to this address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub network: Network,
    pub asset: Asset,
    pub pay_to: Address,
    /// Atomic units of `asset`.
    pub amount: U256,
    pub max_timeout_seconds: u64,
}

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
