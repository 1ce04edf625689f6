//! The upstream side: rewrite the client's request for the upstream (path, query, operator credentials,
//! header hygiene), send it over a pooled connection, and hand back the streamed answer.

use super::body::{Body, BoxError, ClientBodyError};
use super::headers::{remove_hop_by_hop, set_forwarded, METHOD_OVERRIDES};
use super::pool;
use crate::error::GatewayError;
use crate::options::RouteSpec;
use crate::paths::segments;
use http::uri::Scheme;
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use std::net::SocketAddr;

/// Who sent a request, as the listener saw it: made once per connection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    /// `"http"` or `"https"`: the listener's scheme, for `X-Forwarded-Proto`.
    pub proto: &'static str,
    /// The peer's address as `X-Forwarded-For` names it.
    forwarded_for: HeaderValue,
}

impl ClientInfo {
    pub fn new(peer: SocketAddr, proto: &'static str) -> ClientInfo {
        // An IP address's text is always a valid header value.
        let forwarded_for =
            HeaderValue::try_from(peer.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientInfo { peer, proto, forwarded_for }
    }
}

thread_local! {
    /// https upstreams: each thread keeps its own pool, so a request never wakes another thread to reach its
    /// connection. (Plain-http upstreams use the leaner [`pool`].)
    static TLS_POOL: Client<HttpsConnector<HttpConnector>, Body> = super::client::https_client();
}

/// Sends `request` on `route` and waits for the answer's head within the upstream's timeout; the body then
/// streams. The head loses hop-by-hop headers and, in its URLs, the credentials the gateway injected.
pub async fn send(request: Request<Body>, route: &RouteSpec) -> Result<Response<Body>, GatewayError> {
    let upstream = &*route.upstream;
    let answer = tokio::time::timeout(upstream.timeout, async {
        if upstream.scheme == Scheme::HTTP {
            let response = pool::send(request, upstream).await?;
            Ok(response.map(|body| body.map_err(BoxError::from).boxed_unsync()))
        } else {
            // An upstream with its own CA (`ca_file`) has its own client; the others share this thread's.
            let sent = match &upstream.ca {
                Some(ca) => ca.client.request(request),
                None => TLS_POOL.with(|client| client.request(request)),
            };
            let response = sent.await?;
            Ok::<_, BoxError>(response.map(|body| body.map_err(BoxError::from).boxed_unsync()))
        }
    });
    let mut response = match answer.await {
        Err(_) => return Err(GatewayError::UpstreamTimeout),
        Ok(Err(err)) if caused_by::<http_body_util::LengthLimitError>(&*err) => return Err(GatewayError::BodyTooLarge),
        Ok(Err(err)) if caused_by::<ClientBodyError>(&*err) => {
            tracing::info!(upstream = %upstream.name, "the client's request body broke off or was malformed");
            return Err(GatewayError::BodyUnreadable);
        }
        Ok(Err(err)) => {
            // Connection errors carry no URL, so the operator's query credentials cannot leak here.
            tracing::warn!(upstream = %upstream.name, error = %error_chain(&*err), "upstream request failed");
            return Err(GatewayError::UpstreamUnavailable);
        }
        Ok(Ok(response)) => response,
    };
    remove_hop_by_hop(response.headers_mut(), &[]);
    upstream.answer_urls.clean(response.headers_mut(), route.strip_prefix.as_deref());
    Ok(response)
}

/// Builds the upstream request from the client's: the route's upstream and rewritten path, the operator's
/// query parameters and headers (replacing any the client sent under those names), forwarding headers.
pub fn upstream_request(
    mut request: Request<Body>,
    route: &RouteSpec,
    canonical_path: &str,
    client: &ClientInfo,
) -> Result<Request<Body>, GatewayError> {
    let upstream = &route.upstream;
    let original_host = request
        .headers()
        .get(header::HOST)
        .cloned()
        .or_else(|| request.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    *request.uri_mut() = forwarded_uri(request.uri(), route, canonical_path)?;
    *request.version_mut() = Version::HTTP_11;

    let headers = request.headers_mut();
    remove_hop_by_hop(headers, if route.forward_method_override { &[] } else { &METHOD_OVERRIDES });
    set_forwarded(headers, &client.forwarded_for, client.proto, original_host);
    headers.insert(header::HOST, upstream.host.clone());
    for (name, value) in &upstream.headers {
        headers.insert(name, value.clone());
    }
    Ok(request)
}

/// Where the request goes on the upstream: the canonical path (less `strip_prefix`) under the upstream's base
/// path, with the client's query and the operator's parameters.
fn forwarded_uri(client_uri: &Uri, route: &RouteSpec, canonical_path: &str) -> Result<Uri, GatewayError> {
    let upstream = &route.upstream;
    let path = forwarded_path(canonical_path, route.strip_prefix.as_deref());
    // Plain http goes out on our own connections, which take the origin form: most requests keep theirs.
    let keeps_uri = upstream.scheme == Scheme::HTTP
        && upstream.base_path.is_empty()
        && upstream.query.is_empty()
        && path == client_uri.path();
    if let (true, Some(path_and_query)) = (keeps_uri, client_uri.path_and_query()) {
        return Ok(Uri::from(path_and_query.clone()));
    }
    let query = forwarded_query(client_uri.query(), &upstream.query);
    // hyper-util's client (https) picks its connection by the absolute form.
    let origin = if upstream.scheme == Scheme::HTTP {
        String::new()
    } else {
        format!("{}://{}", upstream.scheme, upstream.authority)
    };
    let uri = match query {
        Some(q) => format!("{origin}{}{path}?{q}", upstream.base_path),
        None => format!("{origin}{}{path}", upstream.base_path),
    };
    uri.parse::<Uri>().map_err(|_| GatewayError::BadPath(crate::paths::PathError::BadEscape))
}

/// The canonical path with `strip_prefix`'s segments removed (the route matched, so they are there).
fn forwarded_path<'a>(canonical_path: &'a str, strip_prefix: Option<&str>) -> &'a str {
    let Some(prefix) = strip_prefix else {
        return canonical_path;
    };
    let mut cut = 0;
    for _ in segments(prefix) {
        cut = canonical_path[cut + 1..].find('/').map_or(canonical_path.len(), |i| cut + 1 + i);
    }
    match &canonical_path[cut..] {
        "" => "/",
        rest => rest,
    }
}

/// The client's query string without the parameters the operator injects, then the operator's.
fn forwarded_query(client_query: Option<&str>, injected: &[(String, String)]) -> Option<String> {
    if injected.is_empty() {
        return client_query.map(str::to_string);
    }
    let mut kept = String::new();
    for pair in client_query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let raw_name = pair.split('=').next().unwrap_or("");
        let name = form_urlencoded::parse(raw_name.as_bytes()).next().map(|(k, _)| k).unwrap_or_default();
        if injected.iter().any(|(k, _)| *k == name) {
            continue;
        }
        if !kept.is_empty() {
            kept.push('&');
        }
        kept.push_str(pair);
    }
    Some(form_urlencoded::Serializer::for_suffix(kept, 0).extend_pairs(injected).finish())
}

/// Whether `err`, or an error it was caused by, is a `T`.
pub(crate) fn caused_by<T: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if e.is::<T>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_prefix_keeps_the_rest() {
        assert_eq!(forwarded_path("/public/a/b", Some("/public")), "/a/b");
        assert_eq!(forwarded_path("/public", Some("/public")), "/");
        assert_eq!(forwarded_path("/public/", Some("/public/")), "/");
        assert_eq!(forwarded_path("/v1/x/", Some("/v1")), "/x/");
        assert_eq!(forwarded_path("/a", None), "/a");
    }

    #[test]
    fn injected_query_replaces_client_copies() {
        let injected = vec![("api_key".to_string(), "k&y".to_string())];
        assert_eq!(forwarded_query(Some("q=1&api_key=evil&api%5Fkey=evil2"), &injected).unwrap(), "q=1&api_key=k%26y");
        assert_eq!(forwarded_query(None, &injected).unwrap(), "api_key=k%26y");
        assert_eq!(forwarded_query(Some("a=%20"), &[]).unwrap(), "a=%20");
    }
}
