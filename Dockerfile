# x402-gateway: build in the Rust image, run in a small non-root image with CA certificates.
# The runtime runs the very binary the tests exercise, reading its config from X402_GATEWAY_CONFIG.
#   docker build -t x402-gateway .
#   docker run -p 8402:8402 -v $PWD/examples/docker.toml:/etc/x402-gateway/gateway.toml:ro x402-gateway

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin x402-gateway

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /src/target/release/x402-gateway /usr/local/bin/x402-gateway
WORKDIR /etc/x402-gateway
# gateway.toml and certs/ are mounted here; secrets come as environment variables.
ENV X402_GATEWAY_CONFIG=/etc/x402-gateway/gateway.toml
USER gateway
EXPOSE 8402 8443 9402
ENTRYPOINT ["x402-gateway"]
CMD ["run"]
