//! The route table: method + canonical path → the most specific route. Built once per configuration.

pub mod path;
mod pattern;

pub use path::{canonicalize, PathError};
pub use pattern::PathPattern;

use crate::config::RouteSpec;
use http::Method;
use std::sync::Arc;

pub struct RouteTable {
    /// Most specific first, so the first match wins.
    routes: Vec<Arc<RouteSpec>>,
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
        RouteTable { routes }
    }

    pub fn routes(&self) -> &[Arc<RouteSpec>] {
        &self.routes
    }

    pub fn lookup(&self, method: &Method, canonical_path: &str) -> Result<&Arc<RouteSpec>, Miss> {
        let mut allowed = Vec::new();
        for route in self.routes.iter().filter(|r| r.pattern.matches(canonical_path)) {
            match &route.methods {
                None => return Ok(route),
                Some(methods) if methods.contains(method) => return Ok(route),
                Some(methods) => allowed.extend(methods.iter().cloned()),
            }
        }
        if allowed.is_empty() {
            Err(Miss::NotFound)
        } else {
            allowed.dedup();
            Err(Miss::MethodNotAllowed(allowed))
        }
    }
}
