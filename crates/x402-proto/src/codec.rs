//! The base64 codec of x402 payment headers: emit padded standard base64; accept padded or unpadded
//! standard base64, refuse the url-safe alphabet (as the TypeScript reference does).

use crate::wire::{PaymentPayloadV1, PaymentPayloadV2};
use base64::alphabet::STANDARD;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD as PADDED};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde::Serialize;

/// Decoded payment headers larger than this are refused before any JSON parsing.
pub const MAX_PAYMENT_HEADER_BYTES: usize = 8 * 1024;

const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the payment header is larger than {MAX_PAYMENT_HEADER_BYTES} bytes")]
    TooLarge,
    #[error("the payment header is not standard base64")]
    Base64,
    #[error("the payment header is not a JSON payment payload: {0}")]
    Json(String),
    #[error("x402Version {0} is not supported (1 and 2 are)")]
    Version(u64),
}

pub fn encode<T: Serialize>(value: &T) -> String {
    // Serializing our own wire types cannot fail: they hold only strings, numbers and JSON values.
    PADDED.encode(serde_json::to_vec(value).unwrap_or_default())
}

/// A decoded payment header, by the version its JSON declares.
#[derive(Debug, Clone, PartialEq)]
pub enum PaymentPayload {
    V1(PaymentPayloadV1),
    V2(PaymentPayloadV2),
}

impl PaymentPayload {
    /// The header that decodes to this payload again.
    pub fn encode(&self) -> String {
        match self {
            PaymentPayload::V1(payload) => encode(payload),
            PaymentPayload::V2(payload) => encode(payload),
        }
    }
}

#[derive(serde::Deserialize)]
struct Declared {
    #[serde(rename = "x402Version")]
    version: u64,
}

pub fn decode_payment(header: &[u8]) -> Result<PaymentPayload, DecodeError> {
    // Base64 grows data by 4/3: a header this long cannot decode to an acceptable size.
    if header.len() > MAX_PAYMENT_HEADER_BYTES * 4 / 3 + 4 {
        return Err(DecodeError::TooLarge);
    }
    let trimmed = header.trim_ascii();
    let json = LENIENT.decode(trimmed).map_err(|_| DecodeError::Base64)?;
    // serde reads a struct from a JSON array too; a payment payload is an object.
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err(DecodeError::Json("not a JSON object".into()));
    }
    // The version first (skimming the rest), then straight into its shape: no intermediate JSON tree.
    let Declared { version } = serde_json::from_slice(&json).map_err(|e| {
        DecodeError::Json(if e.is_data() { "missing numeric `x402Version`".into() } else { e.to_string() })
    })?;
    let parsed = match version {
        1 => serde_json::from_slice(&json).map(PaymentPayload::V1),
        2 => serde_json::from_slice(&json).map(PaymentPayload::V2),
        other => return Err(DecodeError::Version(other)),
    };
    parsed.map_err(|e| DecodeError::Json(e.to_string()))
}

/// Decodes a base64 JSON header of any x402 shape (used for `PAYMENT-REQUIRED` and `PAYMENT-RESPONSE`).
pub fn decode<T: serde::de::DeserializeOwned>(header: &[u8]) -> Result<T, DecodeError> {
    let json = LENIENT.decode(header.trim_ascii()).map_err(|_| DecodeError::Base64)?;
    serde_json::from_slice(&json).map_err(|e| DecodeError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1_json() -> String {
        r#"{"x402Version":1,"scheme":"exact","network":"base-sepolia","payload":{ }}"#.to_string()
    }

    #[test]
    fn padded_and_unpadded_standard_base64() {
        let padded = PADDED.encode(v1_json());
        assert!(padded.ends_with('='), "this fixture needs padding to be meaningful");
        assert!(matches!(decode_payment(padded.as_bytes()), Ok(PaymentPayload::V1(_))));
        assert!(matches!(decode_payment(padded.trim_end_matches('=').as_bytes()), Ok(PaymentPayload::V1(_))));
    }

    #[test]
    fn refusals() {
        let url_safe = base64::engine::general_purpose::URL_SAFE.encode([0xfb, 0xff, 0xfe]);
        assert_eq!(decode_payment(url_safe.as_bytes()), Err(DecodeError::Base64));
        assert_eq!(decode_payment(b"not base64!"), Err(DecodeError::Base64));
        assert!(matches!(decode_payment(PADDED.encode("{nope").as_bytes()), Err(DecodeError::Json(_))));
        let v3 = PADDED.encode(r#"{"x402Version":3}"#);
        assert_eq!(decode_payment(v3.as_bytes()), Err(DecodeError::Version(3)));
        let array = PADDED.encode(r#"[2, null, {}, {}]"#);
        assert_eq!(decode_payment(array.as_bytes()), Err(DecodeError::Json("not a JSON object".into())));
        let no_version = PADDED.encode(r#"{"x402Version":"2"}"#);
        let missing = DecodeError::Json("missing numeric `x402Version`".into());
        assert_eq!(decode_payment(no_version.as_bytes()), Err(missing));
        let huge = PADDED.encode(vec![b' '; MAX_PAYMENT_HEADER_BYTES * 2]);
        assert_eq!(decode_payment(huge.as_bytes()), Err(DecodeError::TooLarge));
    }
}
