//! Request paths are put in one canonical form before matching, and that same form is forwarded, so that
//! the route the gateway charges for is the resource the upstream serves (`//paid`, `/%70aid` and `/./paid`
//! cannot reach a free route while the upstream still answers `/paid`).

mod pattern;

pub use pattern::PathPattern;

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
/// escapes, percent-encodes the bytes a URI path cannot carry raw (non-ASCII UTF-8, `"`, `{`, `|`, ...) and
/// refuses dot segments. A trailing slash is kept: upstreams may tell `/a/` from `/a`.
pub fn canonicalize(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Most paths are already canonical: one pass over the bytes, and a copy.
    if is_canonical(raw.as_bytes()) {
        return Ok(raw.to_owned());
    }
    canonical_form(raw)
}

/// The canonical form of a path that starts with `/`, built segment by segment.
fn canonical_form(raw: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(raw.len());
    for segment in raw.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        canonical_segment_into(segment, &mut out)?;
    }
    if out.is_empty() || raw.ends_with('/') {
        out.push('/');
    }
    Ok(out)
}

/// Whether `raw` (starting with `/`) is its own canonical form: every byte stands for itself, and no segment
/// is empty (but a trailing one), `.` or `..`.
fn is_canonical(raw: &[u8]) -> bool {
    let mut segment_start = 1;
    for (i, &byte) in raw.iter().enumerate().skip(1) {
        if byte == b'/' {
            if matches!(&raw[segment_start..i], b"" | b"." | b"..") {
                return false;
            }
            segment_start = i + 1;
        } else if !STANDS_FOR_ITSELF[usize::from(byte)] {
            return false;
        }
    }
    !matches!(&raw[segment_start..], b"." | b"..")
}

/// The bytes a canonical path carries raw besides `/`: unreserved and the path delimiters.
const STANDS_FOR_ITSELF: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = is_unreserved(byte as u8) || is_path_delimiter(byte as u8);
        byte += 1;
    }
    table
};

/// One segment (no `/`) in the form [`canonicalize`] gives it: how a route pattern's literal is compared.
pub fn canonical_segment(segment: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(segment.len());
    canonical_segment_into(segment, &mut out)?;
    Ok(out)
}

fn canonical_segment_into(segment: &str, out: &mut String) -> Result<(), PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let push_escaped = |out: &mut String, byte: u8| {
        out.push('%');
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0xF)] as char);
    };
    let start = out.len();
    let bytes = segment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b';' => return Err(PathError::Ambiguous),
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let escaped = match bytes.get(i + 1..i + 3) {
                    Some(&[high, low]) => hex_value(high).zip(hex_value(low)).map(|(h, l)| h << 4 | l),
                    _ => None,
                };
                match escaped.ok_or(PathError::BadEscape)? {
                    b'/' | b'\\' | b';' => return Err(PathError::Ambiguous),
                    unreserved if is_unreserved(unreserved) => out.push(unreserved as char),
                    other => push_escaped(out, other),
                }
                i += 3;
            }
            raw if is_unreserved(raw) || is_path_delimiter(raw) => {
                out.push(raw as char);
                i += 1;
            }
            // A byte a path cannot carry raw: one of a UTF-8 character's, or ASCII such as `"`, `{`, `|`, `[`.
            raw => {
                push_escaped(out, raw);
                i += 1;
            }
        }
    }
    if matches!(&out[start..], "." | "..") {
        return Err(PathError::DotSegment);
    }
    Ok(())
}

/// RFC 3986 `unreserved`: the characters whose escaped and raw forms are the same resource.
const fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// The rest of RFC 3986 `pchar` (sub-delims, `:`, `@`): kept raw, and their escapes kept escaped, since an
/// upstream may read `=` and `%3D` differently.
const fn is_path_delimiter(byte: u8) -> bool {
    matches!(byte, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@')
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).and_then(|value| u8::try_from(value).ok())
}

/// The non-empty segments of a canonical path.
pub fn segments(canonical: &str) -> impl Iterator<Item = &str> {
    canonical.split('/').filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_agrees_with_the_canonical_form() {
        let alphabet = ["/", "a", "B", ".", "..", "%41", "%2f", "%e9", "é", "~", "=", "%3D", ";", "\\", "\"", " "];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut path = String::from("/");
            for _ in 0..(seed % 7) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                path.push_str(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            assert_eq!(canonicalize(&path), canonical_form(&path), "{path:?}");
        }
        for path in ["/", "/a/", "/a//b", "/./a", "/a/.", "/a/..", "/.a", "/a..", "/a/b/"] {
            assert_eq!(canonicalize(path), canonical_form(path), "{path:?}");
        }
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(canonicalize("/").unwrap(), "/");
        assert_eq!(canonicalize("//a///b").unwrap(), "/a/b");
        assert_eq!(canonicalize("/a/b/").unwrap(), "/a/b/");
        assert_eq!(canonicalize("/%70aid").unwrap(), "/paid");
        assert_eq!(canonicalize("/a%20b").unwrap(), "/a%20b");
        assert_eq!(canonicalize("/caf%C3%A9").unwrap(), "/caf%C3%A9");
        assert_eq!(canonicalize("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(canonicalize("/free/café").unwrap(), "/free/caf%C3%A9");
        assert_eq!(canonicalize("/a\"{b}|c^[d]").unwrap(), "/a%22%7Bb%7D%7Cc%5E%5Bd%5D");
        assert_eq!(canonicalize("/a=b:c@d!$&'()*+,").unwrap(), "/a=b:c@d!$&'()*+,");
        assert_eq!(canonicalize("/a%3Db").unwrap(), "/a%3Db");
    }

    #[test]
    fn refused_forms() {
        assert_eq!(canonicalize("/a/../b"), Err(PathError::DotSegment));
        assert_eq!(canonicalize("/a/%2e%2E/b"), Err(PathError::DotSegment));
        assert_eq!(canonicalize("/./a"), Err(PathError::DotSegment));
        assert_eq!(canonicalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(canonicalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(canonicalize("/a%+1"), Err(PathError::BadEscape));
        assert_eq!(canonicalize("a"), Err(PathError::NotAbsolute));
        assert_eq!(canonicalize("/free%2F..%2Fpaid"), Err(PathError::Ambiguous));
        assert_eq!(canonicalize("/a%5Cb"), Err(PathError::Ambiguous));
        assert_eq!(canonicalize("/paid;jsessionid=1"), Err(PathError::Ambiguous));
        assert_eq!(canonicalize("/public/..\\premium\\report"), Err(PathError::Backslash));
        assert_eq!(canonicalize("/public/%2e%2e\\premium"), Err(PathError::Backslash));
        assert_eq!(canonicalize("/premium\\report"), Err(PathError::Backslash));
    }
}
