//! The x402 protocol as the gateway speaks it: the protocol crate's types, and the 402 challenges it renders.

pub mod challenge;

pub use x402_proto::{codec, exact_evm, reason_label, wire, Rejection};
