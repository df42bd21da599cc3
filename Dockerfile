# syntax=docker/dockerfile:1
# Build: docker build -t pullthrough .
# Run:   docker run -p 5000:5000 -v pullthrough-data:/var/lib/pullthrough pullthrough
#
# One static (musl) binary on distroless static, as the nonroot user. The image
# carries the documented default configuration at /etc/pullthrough/pullthrough.toml;
# Kubernetes mounts its own file over it (deploy/kubernetes/).

FROM rust:1-bookworm AS build
# musl-tools (the linker wrapper) and protobuf-compiler (protoc, for the CRI
# client's generated code) are build-stage only and never reach the
# final image; their versions follow the rust:1-bookworm base image, which is
# what pins it, so pinning the Debian package too would only break the build at
# every Debian point release.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools protobuf-compiler \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
# benches/ is declared in Cargo.toml ([[bench]] load): cargo refuses the
# manifest without it, even for a plain `cargo build`.
COPY Cargo.toml Cargo.lock ./
COPY benches benches
COPY src src
COPY config config
# The image wants a small binary: no debug line tables (kept in release builds
# for profiling), symbols stripped. About 12-15 MB; the image stays under 20 MB.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
    && mkdir -p /out/data \
    && cp target/x86_64-unknown-linux-musl/release/pullthrough /out/pullthrough

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/pullthrough /usr/local/bin/pullthrough
# The data directory exists and belongs to nonroot (65532), so a fresh named
# volume mounted there inherits a writable owner.
COPY --from=build --chown=65532:65532 /out/data /var/lib/pullthrough
COPY config/pullthrough.toml /etc/pullthrough/pullthrough.toml
USER 65532:65532
EXPOSE 5000
VOLUME ["/var/lib/pullthrough"]
ENTRYPOINT ["/usr/local/bin/pullthrough"]
CMD ["serve", "--config", "/etc/pullthrough/pullthrough.toml", "--data", "/var/lib/pullthrough"]
