//! Transport: listeners, TLS, connection limits, the upstream client and header hygiene.

mod connection;
pub mod cors;
pub mod headers;
mod pool;
pub mod server;
pub mod tls;
pub mod upstream;

pub use crate::body;
pub use connection::ClientAddress;
pub use x402_chain::client;
