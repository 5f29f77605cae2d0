# syntax=docker/dockerfile:1
# The data plane image: `ringfence-sidecar`, injected into opted-in pods by the webhook.
# One static binary (musl; rustls + ring) on distroless/static, as UID 65532.
#
#   docker build -f hack/docker/sidecar.Dockerfile -t ghcr.io/ringfence/ringfence-sidecar:dev .
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p ringfence-sidecar --bin ringfence-sidecar \
 && cp target/dist/ringfence-sidecar /ringfence-sidecar
RUN ! ldd /ringfence-sidecar 2>/dev/null | grep -q '=>'

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /ringfence-sidecar /usr/local/bin/ringfence-sidecar
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ringfence-sidecar"]
