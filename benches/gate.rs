//! Micro-benchmarks of the per-request work: payment decode + EIP-712 recovery + checks, route matching on a
//! 1,000-route table, and challenge encoding. `cargo bench --bench gate`.

use alloy::primitives::{keccak256, U256};
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::sol_types::SolStruct;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use std::hint::black_box;
use std::path::Path;
use x402_gateway::config::Config;
use x402_gateway::pricing::{Offer, Pricing};
use x402_gateway::routing::RouteTable;
use x402_gateway::x402::challenge::Challenge;
use x402_gateway::x402::codec;
use x402_gateway::x402::exact_evm::{self, TransferWithAuthorization};
use x402_gateway::x402::wire::ResourceInfo;

const NOW: u64 = 1_750_000_000;

fn config(routes: &str) -> Config {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.api]\nurl = \"http://127.0.0.1:9\"\n[payment]\n\
         pay_to = \"0x90F79bf6EB2c4f870365E785982E1f101E93b906\"\nnetwork = \"eip155:84532\"\nasset = \"USDC\"\n\
         facilitator = \"http://127.0.0.1:9\"\n{routes}"
    );
    Config::parse(&toml, Path::new("bench.toml"), Path::new("."), &|_| None).expect("bench config")
}

fn offer() -> Offer {
    let config = config("[[routes]]\npath = \"/paid\"\nupstream = \"api\"\nprice = \"$0.001\"\n");
    let paid = config.routes.into_iter().next().and_then(|r| r.payment).expect("a paid route");
    match paid.pricing {
        Pricing::Fixed(mut offers) => offers.remove(0),
        Pricing::ByRequest(_) | Pricing::PerToken(_) => unreachable!("a fixed price"),
    }
}

/// A `PAYMENT-SIGNATURE` header as the official v2 client sends it.
fn payment_header(offer: &Offer) -> String {
    let buyer = PrivateKeySigner::from_bytes(&keccak256("bench buyer")).expect("a key");
    let message = TransferWithAuthorization {
        from: buyer.address(),
        to: offer.pay_to,
        value: offer.amount,
        validAfter: U256::from(NOW - 600),
        validBefore: U256::from(NOW + 300),
        nonce: keccak256("bench nonce"),
    };
    let signature = buyer
        .sign_hash_sync(&message.eip712_signing_hash(&exact_evm::domain(
            &offer.asset.eip712_name,
            &offer.asset.eip712_version,
            offer.network.chain_id,
            offer.asset.address,
        )))
        .expect("signed");
    let accepted = x402_gateway::x402::challenge::requirements_v2(offer);
    let payload = serde_json::json!({
        "x402Version": 2,
        "resource": { "url": "http://127.0.0.1:8402/paid" },
        "accepted": accepted,
        "payload": {
            "signature": alloy::hex::encode_prefixed(signature.as_bytes()),
            "authorization": {
                "from": message.from.to_string(), "to": message.to.to_string(), "value": message.value.to_string(),
                "validAfter": message.validAfter.to_string(), "validBefore": message.validBefore.to_string(),
                "nonce": message.nonce.to_string(),
            }
        }
    });
    codec::encode(&payload)
}

fn verification(c: &mut Criterion) {
    let offer = offer();
    let header = payment_header(&offer);
    c.bench_function("decode + recover + checks", |b| {
        b.iter(|| {
            let codec::PaymentPayload::V2(payload) =
                codec::decode_payment(black_box(header.as_bytes())).expect("decodes")
            else {
                unreachable!("a v2 payload")
            };
            let auth = exact_evm::verify_signed(&payload.payload, &offer).expect("verifies");
            exact_evm::check_window(&auth, &offer, NOW).expect("in its window");
            auth
        })
    });
    // Its parts: the header's base64 and JSON alone, and the signature recovery alone.
    c.bench_function("  of which decode", |b| b.iter(|| codec::decode_payment(black_box(header.as_bytes()))));
    let buyer = PrivateKeySigner::from_bytes(&keccak256("bench buyer")).expect("a key");
    let prehash = keccak256("bench message");
    let signature = buyer.sign_hash_sync(&prehash).expect("signed");
    c.bench_function("  of which recovery", |b| {
        b.iter(|| signature.recover_address_from_prehash(black_box(&prehash)).expect("recovers"))
    });
}

fn routing(c: &mut Criterion) {
    let routes: String = (0..1000)
        .map(|i| match i % 3 {
            0 => format!("[[routes]]\npath = \"/api/v1/resource{i}\"\nupstream = \"api\"\n"),
            1 => format!("[[routes]]\npath = \"/api/v1/resource{i}/:id\"\nupstream = \"api\"\n"),
            _ => format!("[[routes]]\npath = \"/files{i}/*\"\nupstream = \"api\"\n"),
        })
        .collect();
    let table = RouteTable::new(config(&routes).routes);
    let paths = ["/api/v1/resource999", "/api/v1/resource997/42", "/files998/a/b/c", "/nowhere/at/all"];
    c.bench_function("route matching, 1,000 routes", |b| {
        b.iter(|| paths.iter().map(|p| table.lookup(&Method::GET, black_box(p)).is_ok()).filter(|ok| *ok).count())
    });
}

fn challenge(c: &mut Criterion) {
    let offers = vec![offer()];
    c.bench_function("challenge encoding (v2 header + v1 body)", |b| {
        b.iter(|| {
            let resource = ResourceInfo {
                url: "http://127.0.0.1:8402/paid".into(),
                description: "Paid data".into(),
                mime_type: "application/json".into(),
            };
            let challenge = Challenge { offers: &offers, resource, rejection: None, bazaar: None };
            (codec::encode(&challenge.payment_required_v2()), serde_json::to_string(&challenge.payment_required_v1()))
        })
    });
}

criterion_group!(benches, verification, routing, challenge);
criterion_main!(benches);
