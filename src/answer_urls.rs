//! URLs in an upstream's answer headers (`Location`, `Content-Location`, `Link`, `Refresh`). The credentials
//! the gateway injected never come back in them: an upstream that builds a redirect from the URL it was asked
//! (`python -m http.server` answers `/docs/sub` with `Location: /docs/sub/?api_key=…`) would hand the client
//! the operator's key. And a `Location` at the upstream's own origin becomes the gateway's path for it, as
//! nginx's default `proxy_redirect` does.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};

/// Injected values shorter than this are not looked for: no credential is that short, and a `2` or a `v1`
/// (an injected `X-Api-Version`) would strike `?page=2` from every pagination link.
const MIN_SEARCHED_LEN: usize = 8;

/// What one upstream's answers must not carry back, and where its own URLs point: made at config load, so an
/// answer without these headers costs a few lookups.
pub struct AnswerUrls {
    scheme: Scheme,
    /// Lower-case.
    host: String,
    /// The port, the scheme's default filled in.
    port: u16,
    /// As [`crate::options::Upstream::base_path`]: no trailing slash, empty for the root.
    base_path: String,
    /// Names of the injected query parameters: a URL's parameter of that name goes, whatever its value.
    params: Vec<String>,
    /// Every injected value, and each word of an injected header value (`Bearer KEY` gives `KEY`), of at least
    /// [`MIN_SEARCHED_LEN`] bytes.
    values: Vec<Vec<u8>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// `Location`, `Content-Location`: one URL reference.
    Url,
    /// `Link`: `<url>; rel=...`, comma-separated.
    Link,
    /// `Refresh`: `5; url=...`.
    Refresh,
}

const HEADERS: [(HeaderName, Carrier); 4] = [
    (header::LOCATION, Carrier::Url),
    (header::CONTENT_LOCATION, Carrier::Url),
    (header::LINK, Carrier::Link),
    (header::REFRESH, Carrier::Refresh),
];

impl AnswerUrls {
    pub fn new(
        scheme: &Scheme,
        authority: &Authority,
        base_path: &str,
        headers: &HeaderMap,
        query: &[(String, String)],
    ) -> AnswerUrls {
        let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
        let mut values: Vec<Vec<u8>> = Vec::new();
        for value in headers.values() {
            let words = value.as_bytes().split(u8::is_ascii_whitespace);
            values.extend(std::iter::once(value.as_bytes()).chain(words).map(<[u8]>::to_vec));
        }
        values.extend(query.iter().map(|(_, value)| value.as_bytes().to_vec()));
        values.retain(|value| value.len() >= MIN_SEARCHED_LEN);
        values.sort();
        values.dedup();
        AnswerUrls {
            scheme: scheme.clone(),
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(default_port),
            base_path: base_path.to_string(),
            params: query.iter().map(|(name, _)| name.clone()).collect(),
            values,
        }
    }

    fn injects(&self) -> bool {
        !self.values.is_empty() || !self.params.is_empty()
    }

    /// Cleans the answer's URL headers for a request routed with `strip_prefix`: injected values out (a query
    /// parameter carrying one goes; a header that would still show one goes whole), and a `Location` or
    /// `Content-Location` at the upstream's origin made the path the client would ask the gateway for.
    pub fn clean(&self, headers: &mut HeaderMap, strip_prefix: Option<&str>) {
        for (name, carrier) in &HEADERS {
            // Only injected values are looked for in `Link` and `Refresh`.
            if (*carrier != Carrier::Url && !self.injects()) || !headers.contains_key(name) {
                continue;
            }
            let values: Vec<HeaderValue> = headers.get_all(name).iter().cloned().collect();
            let cleaned: Vec<Option<HeaderValue>> =
                values.iter().map(|value| self.cleaned(value.clone(), *carrier, strip_prefix)).collect();
            if cleaned.iter().zip(&values).all(|(cleaned, value)| cleaned.as_ref() == Some(value)) {
                continue;
            }
            headers.remove(name);
            for value in cleaned.into_iter().flatten() {
                headers.append(name, value);
            }
        }
    }

    /// The value to send instead of `value`; `None` to send none.
    fn cleaned(&self, value: HeaderValue, carrier: Carrier, strip_prefix: Option<&str>) -> Option<HeaderValue> {
        let Ok(text) = value.to_str() else {
            // Not a URL this can edit: it goes whole if it shows a value.
            return (!self.reveals(value.as_bytes())).then_some(value);
        };
        let replaced = match carrier {
            Carrier::Url => {
                let local = self.gateway_path(text, strip_prefix);
                self.scrub_query(local.as_deref().unwrap_or(text)).or(local)
            }
            Carrier::Link => self.scrub_links(text),
            Carrier::Refresh => self.scrub_refresh(text),
        };
        if self.reveals(replaced.as_deref().unwrap_or(text).as_bytes()) {
            return None;
        }
        match replaced {
            None => Some(value),
            Some(text) => HeaderValue::from_str(&text).ok(),
        }
    }

    /// `url` without the query parameters that carry an injected name or value; `None` if it has none.
    fn scrub_query(&self, url: &str) -> Option<String> {
        if !self.injects() {
            return None;
        }
        let (before_fragment, fragment) = match url.split_once('#') {
            Some((before, fragment)) => (before, Some(fragment)),
            None => (url, None),
        };
        let (head, query) = before_fragment.split_once('?')?;
        let pairs = query.split('&');
        if !pairs.clone().any(|pair| self.carries_injected(pair)) {
            return None;
        }
        let kept: Vec<&str> = pairs.filter(|pair| !self.carries_injected(pair)).collect();
        let mut out = head.to_string();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
        if let Some(fragment) = fragment {
            out.push('#');
            out.push_str(fragment);
        }
        Some(out)
    }

    /// Whether one `name=value` of a query holds an injected parameter or value, in any encoding.
    fn carries_injected(&self, pair: &str) -> bool {
        let (name, value) = form_urlencoded::parse(pair.as_bytes()).next().unwrap_or_default();
        self.params.iter().any(|param| *param == name)
            || self.values.iter().any(|v| contains(value.as_bytes(), v) || contains(name.as_bytes(), v))
    }

    /// Each `<url>` of a `Link` value scrubbed; `None` if none changed.
    fn scrub_links(&self, text: &str) -> Option<String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        let mut changed = false;
        while let Some(open) = rest.find('<') {
            let Some(close) = rest[open..].find('>').map(|at| open + at) else { break };
            let url = &rest[open + 1..close];
            out.push_str(&rest[..=open]);
            match self.scrub_query(url) {
                Some(clean) => {
                    changed = true;
                    out.push_str(&clean);
                }
                None => out.push_str(url),
            }
            rest = &rest[close..];
        }
        out.push_str(rest);
        changed.then_some(out)
    }

    /// The `url=` of a `Refresh` value scrubbed (quoted or not); `None` if unchanged.
    fn scrub_refresh(&self, text: &str) -> Option<String> {
        let start = text.to_ascii_lowercase().find("url=")? + "url=".len();
        let quote = text[start..].chars().next().filter(|c| matches!(c, '\'' | '"'));
        let url_start = start + quote.map_or(0, char::len_utf8);
        let url_end = match quote {
            Some(quote) => text[url_start..].find(quote).map_or(text.len(), |at| url_start + at),
            None => text.len(),
        };
        let clean = self.scrub_query(&text[url_start..url_end])?;
        Some(format!("{}{clean}{}", &text[..url_start], &text[url_end..]))
    }

    /// For an absolute (or scheme-relative) URL at the upstream's origin and under its base path: the
    /// path-absolute URL the client asks the gateway for the same resource (base path off, `strip_prefix` on).
    fn gateway_path(&self, url: &str, strip_prefix: Option<&str>) -> Option<String> {
        let scheme = self.scheme.as_str();
        let rest = match (url.get(..scheme.len()), url.get(scheme.len()..)) {
            (Some(head), Some(rest)) if head.eq_ignore_ascii_case(scheme) && rest.starts_with("://") => &rest[3..],
            _ => url.strip_prefix("//")?,
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority: Authority = rest[..end].parse().ok()?;
        let default_port = if self.scheme == Scheme::HTTPS { 443 } else { 80 };
        if !authority.host().eq_ignore_ascii_case(&self.host)
            || authority.port_u16().unwrap_or(default_port) != self.port
        {
            return None;
        }
        let under_base = rest[end..].strip_prefix(self.base_path.as_str())?;
        if !(under_base.is_empty() || under_base.starts_with(['/', '?', '#'])) {
            return None;
        }
        let mut local = strip_prefix.map_or("", |prefix| prefix.trim_end_matches('/')).to_string();
        if !under_base.starts_with('/') {
            local.push('/');
        }
        local.push_str(under_base);
        Some(local)
    }

    /// Whether `text` shows an injected value: as is, percent-decoded (once or twice) or form-decoded.
    fn reveals(&self, text: &[u8]) -> bool {
        if self.values.is_empty() {
            return false;
        }
        let once = percent_decode(text, false);
        let forms = [once.clone(), percent_decode(text, true), percent_decode(&once, false)];
        self.values.iter().any(|value| contains(text, value) || forms.iter().any(|form| contains(form, value)))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|window| window == needle)
}

/// `%XX` decoded (an invalid escape is kept as it is), and `+` as a space when `plus_is_space`.
fn percent_decode(text: &[u8], plus_is_space: bool) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        match (text[i], text.get(i + 1).copied().and_then(hex), text.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            (b'+', _, _) if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-live 9f&3a=c0";
    const TOKEN: &str = "tok-4242-abcd";

    fn urls(base_path: &str) -> AnswerUrls {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {TOKEN}")).unwrap());
        headers.insert("x-version", HeaderValue::from_static("2"));
        let query = vec![("api_key".to_string(), KEY.to_string())];
        AnswerUrls::new(&Scheme::HTTP, &"Up.Internal:8080".parse().unwrap(), base_path, &headers, &query)
    }

    fn cleaned(urls: &AnswerUrls, name: HeaderName, value: &str, strip_prefix: Option<&str>) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(name.clone(), HeaderValue::from_str(value).unwrap());
        urls.clean(&mut headers, strip_prefix);
        headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn a_query_parameter_carrying_an_injected_value_goes_in_any_encoding() {
        let urls = urls("");
        let encoded: String = form_urlencoded::byte_serialize(KEY.as_bytes()).collect();
        for (location, expected) in [
            (format!("/docs/sub/?api_key={encoded}"), "/docs/sub/"),
            (format!("/docs/sub/?a=1&api_key={encoded}&b=2#top"), "/docs/sub/?a=1&b=2#top"),
            (format!("/x?next={}", KEY.replace(' ', "%20").replace('&', "%26").replace('=', "%3d")), "/x"),
            (format!("/x?auth=Bearer+{TOKEN}&page=2"), "/x?page=2"),
            (format!("/x?{}=1&page=2", TOKEN.replace('-', "%2d")), "/x?page=2"),
        ] {
            assert_eq!(cleaned(&urls, header::LOCATION, &location, None).as_deref(), Some(expected), "{location}");
        }
    }

    #[test]
    fn short_injected_values_and_clean_headers_are_left_alone() {
        let urls = urls("");
        let link = "</items?page=2&version=2>; rel=\"next\"";
        assert_eq!(cleaned(&urls, header::LINK, link, None).as_deref(), Some(link));
        assert_eq!(cleaned(&urls, header::LOCATION, "/plain?Bearer=1", None).as_deref(), Some("/plain?Bearer=1"));
    }

    #[test]
    fn a_header_that_cannot_be_cleaned_goes_whole() {
        let urls = urls("");
        assert_eq!(cleaned(&urls, header::LOCATION, &format!("/keys/{TOKEN}/"), None), None);
        assert_eq!(cleaned(&urls, header::CONTENT_LOCATION, "/x#t=tok-4242%2Dabcd", None), None);
        assert_eq!(cleaned(&urls, header::LINK, &format!("</a/{TOKEN}>; rel=next"), None), None);
        let mut headers = HeaderMap::new();
        headers.insert(header::LOCATION, HeaderValue::from_bytes(&[b"/\xe9", TOKEN.as_bytes()].concat()).unwrap());
        urls.clean(&mut headers, None);
        assert!(headers.is_empty(), "not text, and it shows the value");
    }

    #[test]
    fn link_and_refresh_urls_lose_the_parameter() {
        let urls = urls("");
        let link = format!("</p?n=2&api_key=x>; rel=\"next\", </p?token={TOKEN}>; rel=prev");
        assert_eq!(
            cleaned(&urls, header::LINK, &link, None).as_deref(),
            Some("</p?n=2>; rel=\"next\", </p>; rel=prev")
        );
        let refresh = format!("5; URL='/p?token={TOKEN}&n=1'");
        assert_eq!(cleaned(&urls, header::REFRESH, &refresh, None).as_deref(), Some("5; URL='/p?n=1'"));
    }

    #[test]
    fn a_location_at_the_upstreams_origin_becomes_the_gateways_path() {
        let urls = urls("/base");
        for (location, strip_prefix, expected) in [
            ("http://up.internal:8080/base/next?x=1", None, "/next?x=1"),
            ("HTTP://UP.INTERNAL:8080/base", Some("/public/"), "/public/"),
            ("//up.internal:8080/base/a#f", Some("/public"), "/public/a#f"),
            ("http://up.internal:8080/base/a?api_key=k", Some("/public"), "/public/a"),
            ("http://up.internal:8080/basement", None, "http://up.internal:8080/basement"),
            ("http://up.internal:8080/other", None, "http://up.internal:8080/other"),
            ("http://up.internal/base/a", None, "http://up.internal/base/a"),
            ("https://up.internal:8080/base/a", None, "https://up.internal:8080/base/a"),
            ("https://elsewhere.example/base/a", None, "https://elsewhere.example/base/a"),
        ] {
            let shown = cleaned(&urls, header::LOCATION, location, strip_prefix);
            assert_eq!(shown.as_deref(), Some(expected), "{location}");
        }
        let http_default = AnswerUrls::new(&Scheme::HTTP, &"up".parse().unwrap(), "", &HeaderMap::new(), &[]);
        assert_eq!(cleaned(&http_default, header::LOCATION, "http://up:80/a", None).as_deref(), Some("/a"));
    }
}
