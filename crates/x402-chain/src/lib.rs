//! Chain access and settlement: alloy providers over our own HTTP client, the in-process settler (one
//! transaction queue per key, batches through Multicall3, simulations, receipts) and the remote facilitator
//! client. Takes typed options ([`options`]), never a configuration file; knows nothing of HTTP serving.

pub mod chain;
pub mod client;
pub mod options;
pub mod settlement;

/// A node's or facilitator's URL as it may be shown: scheme, host and port only. Providers put the key in
/// the path (`/v2/KEY`), the query (`?apikey=`) or the user info, so everything past the authority is hidden.
pub fn redacted_url(url: &str) -> String {
    let Ok(uri) = url.parse::<http::Uri>() else { return "<redacted>".into() };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else { return "<redacted>".into() };
    let port = uri.port().map(|p| format!(":{p}")).unwrap_or_default();
    let hidden = match (uri.path(), uri.query(), uri.authority().is_some_and(|a| a.as_str().contains('@'))) {
        ("" | "/", None, false) => "",
        _ => "/<redacted>",
    };
    format!("{scheme}://{host}{port}{hidden}")
}
