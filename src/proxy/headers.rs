//! Header hygiene between client and upstream (RFC 9110 §7.6.1).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Request;

const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
/// Headers some frameworks obey in place of the request's method: a route was matched and priced for the
/// request's own method, so they are not forwarded unless the route allows them.
pub static METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes the hop-by-hop headers, including every header that `Connection` names, and the headers in `also`
/// (in the same pass over the map).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, also: &[HeaderName]) {
    // Without allocating on the usual path (one `Connection` value): names are looked up as the `&str`s they are.
    let mut connection = headers.get_all(header::CONNECTION).iter();
    let first = connection.next().cloned();
    let more: Vec<HeaderValue> = connection.cloned().collect();
    for value in first.iter().chain(&more) {
        let Ok(value) = value.to_str() else { continue };
        for name in value.split(',') {
            headers.remove(name.trim());
        }
    }
    while let Some(hop) = headers.keys().find(|name| HOP_BY_HOP.contains(name) || also.contains(name)).cloned() {
        headers.remove(hop);
    }
}

/// Whether the request names the host it was sent to: a `Host` header, or the authority of an h2 `:authority`
/// or an absolute-form target. Without one there is no URL to put in a challenge, and HTTP/1.1 requires it.
pub fn names_host<B>(request: &Request<B>) -> bool {
    request.uri().authority().is_some() || request.headers().get(header::HOST).is_some_and(|host| !host.is_empty())
}

/// Appends the client (its address, as `X-Forwarded-For` names it) to `X-Forwarded-For` and sets
/// `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub fn set_forwarded(headers: &mut HeaderMap, client: &HeaderValue, proto: &'static str, host: Option<HeaderValue>) {
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).filter(|v| v.to_str().is_ok()) {
        Some(previous) => HeaderValue::from_bytes(&[previous.as_bytes(), b", ", client.as_bytes()].concat()).ok(),
        None => Some(client.clone()),
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_go_too() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-Secret-Hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut h, &[]);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            "https",
            Some(HeaderValue::from_static("api.example")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example");
    }

    #[test]
    fn every_connection_value_names_headers_in_any_case() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive, Close"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-one ,X-Two, ,not a name"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        remove_hop_by_hop(&mut h, &[]);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn a_forwarded_for_that_is_not_text_is_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_bytes(b"\xff").unwrap());
        set_forwarded(&mut h, &HeaderValue::from_static("::1"), "http", None);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert!(!h.contains_key("x-forwarded-host"));
    }
}
