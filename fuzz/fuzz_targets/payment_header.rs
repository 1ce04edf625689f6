//! Fuzzes the payment gate end to end: header decoding, offer matching, exact-EVM verification and the
//! replay reservation. The first byte picks the input's form: raw header bytes, or JSON that is base64-encoded
//! first so that mutations reach the JSON and verification code instead of dying in base64.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;
use x402_gateway::config::Config;
use x402_gateway::gate::PaymentGate;
use x402_gateway::pricing::{Offer, Pricing};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[upstreams.api]
url = "http://127.0.0.1:9"
[payment]
pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
network = "eip155:84532"
asset = "USDC"
facilitator = "http://127.0.0.1:9"
[[routes]]
path = "/paid"
upstream = "api"
price = "$0.001"
accepts = [{ network = "base-sepolia" }, { network = "eip155:8453", pay_to = "0x1111111111111111111111111111111111111111" }]
"#;

fn fixture() -> &'static (Vec<Offer>, PaymentGate) {
    static FIXTURE: OnceLock<(Vec<Offer>, PaymentGate)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let config = Config::parse(CONFIG, Path::new("fuzz.toml"), Path::new("."), &|_| None).expect("fuzz config");
        let paid = config.routes.into_iter().next().and_then(|r| r.payment).expect("a paid route");
        let Pricing::Fixed(offers) = paid.pricing else { panic!("a fixed price") };
        (offers, PaymentGate::new(1000))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let header = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        base64::engine::general_purpose::STANDARD.encode(rest).into_bytes()
    };
    // Whatever header a carrier finds the payment in, the gate gets its bytes.
    if http::HeaderValue::from_bytes(&header).is_err() {
        return;
    }
    let (offers, gate) = fixture();
    let _ = gate.check(offers, Some(&header), 1_750_000_000);
});
