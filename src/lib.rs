//! x402-gateway: a reverse proxy that turns an HTTP API into a pay-per-call API with the x402 protocol.
//! The binary (`main.rs`) is a thin command line over this library.

pub mod admin;
pub mod answer_urls;
pub mod answers;
pub mod attempts;
pub mod body;
pub mod buyer;
pub mod carrier;
pub mod catalogue;
pub mod config;
pub mod discovery;
pub mod error;
pub mod gate;
pub mod ledger;
pub mod logging;
pub mod metering;
pub mod metrics;
pub mod options;
pub mod paths;
pub mod pipeline;
pub mod pricing;
pub mod proxy;
pub mod replay;
pub mod respond;
pub mod routing;
pub mod text;
pub mod usage;
pub mod x402;

pub use x402_chain::{chain, settlement};
pub use x402_proto::networks;
