# syntax=docker/dockerfile:1
# The control plane image: `ringfence operator`, `ringfence webhook`, `ringfence budget`.
# One static binary (musl; rustls + ring, SQLite bundled) on distroless/static, as UID 65532.
#
#   docker build -f hack/docker/ringfence.Dockerfile -t ghcr.io/ringfence/ringfence:dev .
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-alpine AS build
# musl-dev: ring's and SQLite's C compile against musl, and Alpine links statically by default.
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p ringfence --bin ringfence \
 && cp target/dist/ringfence /ringfence
# Fail the build, not the pod, if anything linked dynamically.
RUN ! ldd /ringfence 2>/dev/null | grep -q '=>'

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /ringfence /usr/local/bin/ringfence
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ringfence"]
