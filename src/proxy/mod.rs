//! Transport: listeners, TLS, connection limits, the upstream client and header hygiene.

pub mod answer_urls;
pub mod body;
mod connection;
pub mod cors;
pub mod headers;
mod pool;
pub mod server;
pub mod tls;
pub mod upstream;

pub use connection::ClientAddress;
pub use x402_chain::client;
