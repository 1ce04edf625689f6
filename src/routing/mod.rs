//! The route table: method + canonical path → the most specific route. Built once per configuration.

pub use crate::paths::{self as path, canonicalize, PathError, PathPattern};

use crate::options::RouteSpec;
use http::Method;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

pub struct RouteTable {
    /// Most specific first, so the first match wins.
    routes: Vec<Arc<RouteSpec>>,
    /// Routes filed under their leading literal segments, so a lookup tests only the routes that could match.
    index: Node,
}

/// A trie over lower-cased literal segments; each node holds the positions (in `routes`) of the patterns
/// whose leading literal segments end there.
#[derive(Default)]
struct Node {
    routes: Vec<usize>,
    children: HashMap<String, Node>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Miss {
    NotFound,
    /// The path is routed, but not for this method; carries the methods that are.
    MethodNotAllowed(Vec<Method>),
}

impl RouteTable {
    pub fn new(specs: Vec<RouteSpec>) -> RouteTable {
        let mut routes: Vec<Arc<RouteSpec>> = specs.into_iter().map(Arc::new).collect();
        // A stable sort keeps the file's order between equally specific routes.
        routes.sort_by_key(|r| r.pattern.precedence());
        let mut index = Node::default();
        for (position, route) in routes.iter().enumerate() {
            let node =
                route.pattern.leading_literals().fold(&mut index, |node, lit| node.children.entry(lit).or_default());
            node.routes.push(position);
        }
        RouteTable { routes, index }
    }

    /// Positions of the routes that may match, most specific first.
    fn candidates(&self, canonical_path: &str) -> Vec<usize> {
        let mut found = self.index.routes.clone();
        let mut node = &self.index;
        for segment in path::segments(canonical_path) {
            let key = match segment.bytes().any(|b| b.is_ascii_uppercase()) {
                true => Cow::Owned(segment.to_ascii_lowercase()),
                false => Cow::Borrowed(segment),
            };
            let Some(child) = node.children.get(key.as_ref()) else { break };
            found.extend_from_slice(&child.routes);
            node = child;
        }
        found.sort_unstable();
        found
    }

    pub fn routes(&self) -> &[Arc<RouteSpec>] {
        &self.routes
    }

    /// The most specific route for this method and path. A path that a paid route matches is never served by
    /// a less specific free route for another method (a paid `GET /premium/*` and a free `/*` must not serve
    /// `POST /premium/report` free): that is 405.
    pub fn lookup(&self, method: &Method, canonical_path: &str) -> Result<&Arc<RouteSpec>, Miss> {
        let mut allowed = Vec::new();
        let mut paid_for_other_methods = false;
        let candidates = self.candidates(canonical_path).into_iter().map(|position| &self.routes[position]);
        for route in candidates.filter(|r| r.pattern.matches(canonical_path)) {
            if allows(route, method) {
                if paid_for_other_methods && route.payment.is_none() {
                    continue;
                }
                return Ok(route);
            }
            paid_for_other_methods |= route.payment.is_some();
            match &route.methods {
                Some(methods) => allowed.extend(methods.iter().cloned()),
                None => allowed.extend(ANY_METHOD.iter().cloned()),
            }
        }
        if allowed.is_empty() {
            Err(Miss::NotFound)
        } else {
            allowed.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            allowed.dedup();
            Err(Miss::MethodNotAllowed(allowed))
        }
    }
}

/// What a route without `methods` serves: any method but `TRACE` (it echoes the request, the operator's
/// injected credentials included) and `CONNECT` (a tunnel, not a request), which a route must list.
const ANY_METHOD: [Method; 7] =
    [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS];

fn allows(route: &RouteSpec, method: &Method) -> bool {
    match &route.methods {
        Some(methods) => methods.contains(method),
        None => method != Method::TRACE && method != Method::CONNECT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn table(patterns: &[(&str, Option<&str>)]) -> RouteTable {
        let mut toml =
            String::from("[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.api]\nurl = \"http://127.0.0.1:9\"\n");
        for (pattern, method) in patterns {
            toml += &format!("[[routes]]\npath = \"{pattern}\"\nupstream = \"api\"\n");
            if let Some(method) = method {
                toml += &format!("methods = [\"{method}\"]\n");
            }
        }
        let config = Config::parse(&toml, Path::new("gateway.toml"), Path::new("."), &|_| None).expect("valid");
        RouteTable::new(config.routes)
    }

    /// What a plain scan of every route, most specific first, finds.
    fn scan<'t>(table: &'t RouteTable, method: &Method, path: &str) -> Option<&'t Arc<RouteSpec>> {
        table.routes.iter().find(|r| r.pattern.matches(path) && allows(r, method))
    }

    #[test]
    fn the_index_finds_what_a_scan_of_every_route_finds() {
        let table = table(&[
            ("/", None),
            ("/*", Some("POST")),
            ("/weather", None),
            ("/Weather/:city", None),
            ("/weather/lisbon", Some("GET")),
            ("/:any/lisbon", None),
            ("/v1/users/:id/posts", None),
            ("/v1/*", None),
            ("/v1/users/*", Some("DELETE")),
            ("/files/*", None),
        ]);
        let paths = [
            "/",
            "/weather",
            "/WEATHER/",
            "/weather/lisbon",
            "/weather/porto",
            "/x/lisbon",
            "/v1",
            "/v1/users",
            "/v1/users/7/posts",
            "/v1/users/7/likes",
            "/files",
            "/files/a/b",
            "/nothing",
            "/Weather/Lisbon",
        ];
        for method in [Method::GET, Method::POST, Method::DELETE] {
            for path in paths {
                let indexed = table.lookup(&method, path).ok().map(|r| r.pattern_text.clone());
                let scanned = scan(&table, &method, path).map(|r| r.pattern_text.clone());
                assert_eq!(indexed, scanned, "{method} {path}");
            }
        }
        assert_eq!(table.lookup(&Method::GET, "/weather/lisbon").map(|r| &*r.pattern_text), Ok("/weather/lisbon"));
        assert_eq!(table.lookup(&Method::PUT, "/nothing").err(), Some(Miss::MethodNotAllowed(vec![Method::POST])));
    }
}
