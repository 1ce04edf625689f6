//! Route path patterns: exact (`/weather`), named segments (`/users/:id`) and prefix (`/public/*`).

use super::{canonical_segment, segments};
use std::cmp::Reverse;

#[derive(Debug, Clone)]
pub struct PathPattern {
    segments: Vec<Segment>,
    /// A trailing `/*`: matches the prefix itself and anything below it.
    prefix: bool,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Param,
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<PathPattern, String> {
        let body = text.strip_prefix('/').ok_or_else(|| format!("`{text}` must start with `/`"))?;
        let (body, prefix) = match body.strip_suffix('*') {
            Some(rest) if rest.is_empty() || rest.ends_with('/') => (rest.trim_end_matches('/'), true),
            Some(_) => return Err(format!("`{text}`: `*` is only allowed as a whole last segment (`/prefix/*`)")),
            None => (body.trim_end_matches('/'), false),
        };
        let segments = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').map(|s| segment(text, s)).collect::<Result<_, _>>()?
        };
        Ok(PathPattern { segments, prefix })
    }

    pub fn matches(&self, canonical_path: &str) -> bool {
        let mut path = segments(canonical_path);
        for expected in &self.segments {
            match (expected, path.next()) {
                (_, None) => return false,
                (Segment::Literal(lit), Some(got)) if !lit.eq_ignore_ascii_case(got) => return false,
                _ => {}
            }
        }
        self.prefix || path.next().is_none()
    }

    /// Sort key: exact before named segments before prefixes; then the pattern with more fixed text first.
    pub fn precedence(&self) -> impl Ord {
        let literals = self.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        let kind = match (self.prefix, literals == self.segments.len()) {
            (false, true) => 0,
            (false, false) => 1,
            (true, _) => 2,
        };
        (kind, Reverse(self.segments.len()), Reverse(literals))
    }

    /// The literal segments before the first named one (or the end), lower-cased: where the route index files
    /// this pattern.
    pub fn leading_literals(&self) -> impl Iterator<Item = String> + '_ {
        self.segments.iter().map_while(|s| match s {
            Segment::Literal(lit) => Some(lit.to_ascii_lowercase()),
            Segment::Param => None,
        })
    }

    /// Whether `prefix` (a path such as `/public`) is made of this pattern's leading literal segments.
    pub fn has_literal_prefix(&self, prefix: &str) -> bool {
        let mut own = self.segments.iter();
        segments(prefix).all(|want| {
            let want = canonical_segment(want);
            matches!((own.next(), want), (Some(Segment::Literal(lit)), Ok(want)) if lit.eq_ignore_ascii_case(&want))
        })
    }
}

fn segment(pattern: &str, text: &str) -> Result<Segment, String> {
    if text.is_empty() {
        return Err(format!("`{pattern}` has an empty segment (`//`)"));
    }
    if text.contains('*') {
        return Err(format!("`{pattern}`: `*` is only allowed as a whole last segment (`/prefix/*`)"));
    }
    match text.strip_prefix(':') {
        Some("") => Err(format!("`{pattern}`: a named segment needs a name (`:id`)")),
        Some(_) => Ok(Segment::Param),
        // In the form requests are matched in: `/café` and `/caf%C3%A9` are one route.
        None => canonical_segment(text).map(Segment::Literal).map_err(|err| format!("`{pattern}`: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> PathPattern {
        PathPattern::parse(text).unwrap()
    }

    #[test]
    fn exact_named_and_prefix() {
        assert!(p("/weather").matches("/weather") && p("/weather").matches("/Weather/"));
        assert!(!p("/weather").matches("/weather/x"));
        assert!(p("/users/:id").matches("/users/7") && !p("/users/:id").matches("/users"));
        assert!(p("/public/*").matches("/public") && p("/public/*").matches("/public/a/b"));
        assert!(!p("/public/*").matches("/publicity"));
        assert!(p("/*").matches("/") && p("/*").matches("/anything"));
        assert!(p("/").matches("/") && !p("/").matches("/a"));
        assert!(p("/free/café").matches("/free/caf%C3%A9") && p("/free/caf%c3%a9").matches("/free/caf%C3%A9"));
    }

    #[test]
    fn invalid_patterns() {
        for bad in ["weather", "/a*", "/*/b", "/a//b", "/users/:", "/a/../b", "/a\\b", "/a%zz"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn literal_prefix() {
        assert!(p("/public/*").has_literal_prefix("/public"));
        assert!(p("/v1/users/:id").has_literal_prefix("/v1/"));
        assert!(!p("/public/*").has_literal_prefix("/pub"));
        assert!(!p("/:x/*").has_literal_prefix("/a"));
        assert!(p("/café/*").has_literal_prefix("/café"));
    }
}
