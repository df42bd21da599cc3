# syntax=docker/dockerfile:1
# Build: docker build -t pullthrough .
# Run:   docker run -p 5000:5000 -v pullthrough-data:/var/lib/pullthrough pullthrough

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY config config
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
    && mkdir -p /out/data \
    && cp target/x86_64-unknown-linux-musl/release/pullthrough /out/pullthrough

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/pullthrough /usr/local/bin/pullthrough
COPY --from=build --chown=65532:65532 /out/data /var/lib/pullthrough
COPY config/pullthrough.toml /etc/pullthrough/pullthrough.toml
USER 65532:65532
EXPOSE 5000
VOLUME ["/var/lib/pullthrough"]
ENTRYPOINT ["/usr/local/bin/pullthrough"]
CMD ["serve", "--config", "/etc/pullthrough/pullthrough.toml", "--data", "/var/lib/pullthrough"]
