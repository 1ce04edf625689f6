//! Request paths are put in one canonical form before matching, and that same form is forwarded, so that
//! the route the gateway charges for is the resource the upstream serves (`//paid`, `/%70aid` and `/./paid`
//! cannot reach a free route while the upstream still answers `/paid`).

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains an invalid percent-escape")]
    BadEscape,
    #[error("the path contains a `.` or `..` segment")]
    DotSegment,
    #[error("the path must start with `/`")]
    NotAbsolute,
    /// An encoded `/` or `\\`, or a `;` parameter: upstreams disagree on them, so a path could be matched as one
    /// route here and served as another there.
    #[error("the path contains an encoded separator or a `;` parameter")]
    Ambiguous,
    /// A raw `\`: WHATWG URL parsers (Node, Deno, Bun, Workers, Hono) and IIS read it as `/` and then resolve
    /// dot segments, so `/free/..\paid` would be routed free here and served as `/paid` there.
    #[error("the path contains a `\\`")]
    Backslash,
}

/// Collapses repeated slashes, decodes percent-escaped unreserved characters, upper-cases the remaining
/// escapes and refuses dot segments. A trailing slash is kept: upstreams may tell `/a/` from `/a`.
pub fn canonicalize(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let mut out = String::with_capacity(raw.len());
    for segment in raw.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        let start = out.len();
        decode_unreserved(segment, &mut out)?;
        if matches!(&out[start..], "." | "..") {
            return Err(PathError::DotSegment);
        }
    }
    if out.is_empty() || raw.ends_with('/') {
        out.push('/');
    }
    Ok(out)
}

fn decode_unreserved(segment: &str, out: &mut String) -> Result<(), PathError> {
    let bytes = segment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b';' => return Err(PathError::Ambiguous),
            b'\\' => return Err(PathError::Backslash),
            _ => {}
        }
        if bytes[i] != b'%' {
            out.push(bytes[i] as char);
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
        let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadEscape)?;
        let byte = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEscape)?;
        if matches!(byte, b'/' | b'\\' | b';') {
            return Err(PathError::Ambiguous);
        }
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push('%');
            out.push_str(&hex.to_ascii_uppercase());
        }
        i += 3;
    }
    Ok(())
}

/// The non-empty segments of a canonical path.
pub fn segments(canonical: &str) -> impl Iterator<Item = &str> {
    canonical.split('/').filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        assert_eq!(canonicalize("/").unwrap(), "/");
        assert_eq!(canonicalize("//a///b").unwrap(), "/a/b");
        assert_eq!(canonicalize("/a/b/").unwrap(), "/a/b/");
        assert_eq!(canonicalize("/%70aid").unwrap(), "/paid");
        assert_eq!(canonicalize("/a%20b").unwrap(), "/a%20b");
        assert_eq!(canonicalize("/caf%C3%A9").unwrap(), "/caf%C3%A9");
    }

    #[test]
    fn refused_forms() {
        assert_eq!(canonicalize("/a/../b"), Err(PathError::DotSegment));
        assert_eq!(canonicalize("/a/%2e%2E/b"), Err(PathError::DotSegment));
        assert_eq!(canonicalize("/./a"), Err(PathError::DotSegment));
        assert_eq!(canonicalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(canonicalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(canonicalize("a"), Err(PathError::NotAbsolute));
        assert_eq!(canonicalize("/free%2F..%2Fpaid"), Err(PathError::Ambiguous));
        assert_eq!(canonicalize("/a%5Cb"), Err(PathError::Ambiguous));
        assert_eq!(canonicalize("/paid;jsessionid=1"), Err(PathError::Ambiguous));
        assert_eq!(canonicalize("/public/..\\premium\\report"), Err(PathError::Backslash));
        assert_eq!(canonicalize("/public/%2e%2e\\premium"), Err(PathError::Backslash));
        assert_eq!(canonicalize("/premium\\report"), Err(PathError::Backslash));
    }
}
