# x402-gateway: build in the Rust image, run in a small non-root image with CA certificates.
# The runtime runs the very binary the tests exercise, reading its config from X402_GATEWAY_CONFIG and writing
# its ledger to /var/lib/x402-gateway (a volume owned by the runtime user).
#   docker build -t x402-gateway .
#   docker run -p 8402:8402 -e PAY_TO=0xYourAddress -v x402-data:/var/lib/x402-gateway \
#     -v $PWD/examples/docker.toml:/etc/x402-gateway/gateway.toml:ro x402-gateway
# tests/docker.rs builds from exactly the files copied here and runs the binary with this layout.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other crates (the protocol crate).
COPY crates ./crates
# Cargo.toml declares the `gate` bench: without its source cargo refuses the manifest.
COPY benches ./benches
RUN cargo build --release --locked --bin x402-gateway

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/x402-gateway \
    && chown 10001:10001 /var/lib/x402-gateway
COPY --from=build /src/target/release/x402-gateway /usr/local/bin/x402-gateway
WORKDIR /etc/x402-gateway
# gateway.toml and certs/ are mounted here, read-only; secrets come as environment variables.
ENV X402_GATEWAY_CONFIG=/etc/x402-gateway/gateway.toml
# What the gateway writes (the ledger: `[ledger] path` in examples/docker.toml) outlives the container.
VOLUME ["/var/lib/x402-gateway"]
USER 10001:10001
EXPOSE 8402 8443 9402
ENTRYPOINT ["x402-gateway"]
CMD ["run"]
