//! The request pipeline, top to bottom in one place:
//! accept (proxy::server) → match route → [price → payment gate] → upstream → [settle] → respond.

use crate::admin;
use crate::config::{Config, Limits, RouteSpec};
use crate::error::GatewayError;
use crate::proxy::body::{Body, BoxError};
use crate::proxy::upstream::{upstream_request, ClientInfo, UpstreamClient};
use crate::routing::{self, Miss, RouteTable};
use http::{header, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Instant;

pub struct Gateway {
    routes: RouteTable,
    upstreams: UpstreamClient,
    limits: Limits,
}

impl Gateway {
    pub fn new(config: Config) -> Gateway {
        Gateway {
            routes: RouteTable::new(config.routes),
            upstreams: UpstreamClient::new(),
            limits: config.server.limits,
        }
    }

    /// Serves one request on a public listener and writes its access-log line.
    pub async fn handle(&self, request: Request<Incoming>, client: ClientInfo) -> Response<Body> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let mut route_name = None;
        let response = match self.process(request, client, &mut route_name).await {
            Ok(response) => response,
            Err(err) => err.into_response(),
        };
        tracing::info!(
            target: "access",
            %method,
            path,
            route = route_name.as_deref().unwrap_or("-"),
            status = response.status().as_u16(),
            latency_ms = started.elapsed().as_secs_f64() * 1e3,
            client = %client.peer.ip(),
        );
        response
    }

    async fn process(
        &self,
        request: Request<Incoming>,
        client: ClientInfo,
        route_name: &mut Option<String>,
    ) -> Result<Response<Body>, GatewayError> {
        let canonical_path = routing::canonicalize(request.uri().path())?;
        let route = self.match_route(&request, &canonical_path)?;
        *route_name = Some(route.pattern_text.clone());
        let request = self.limit_body(request)?;
        let request = upstream_request(request, &route, &canonical_path, client)?;
        self.upstreams.send(request, &route.upstream).await
    }

    fn match_route<B>(
        &self,
        request: &Request<B>,
        canonical_path: &str,
    ) -> Result<Arc<RouteSpec>, GatewayError> {
        match self.routes.lookup(request.method(), canonical_path) {
            Ok(route) => Ok(route.clone()),
            Err(Miss::NotFound) => Err(GatewayError::NoRoute),
            Err(Miss::MethodNotAllowed(allowed)) => Err(GatewayError::MethodNotAllowed(allowed)),
        }
    }

    /// Refuses a declared oversized body at once, and caps a streamed one as it passes.
    fn limit_body(&self, request: Request<Incoming>) -> Result<Request<Body>, GatewayError> {
        let limit = self.limits.max_body_bytes;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit) {
            return Err(GatewayError::BodyTooLarge);
        }
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(request.map(|body| {
            Limited::new(body, limit)
                .map_err(BoxError::from)
                .boxed_unsync()
        }))
    }

    pub async fn handle_admin(&self, request: Request<Incoming>) -> Response<Body> {
        admin::respond(&request)
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }
}
