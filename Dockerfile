# syntax=docker/dockerfile:1
#
# The relay image: a release build of the `relay` binary on Debian slim, run as a
# non-root user. `fly deploy` builds it (fly.toml); locally: `docker build -t relay .`
# then `docker run --rm -p 8080:8080 relay relay serve --dev`.
#
# Two stages. `builder` compiles the dependencies in a layer of their own, from the
# manifests and the lock file with stub sources in place of the real ones, so that a
# change to the relay's code rebuilds only the relay crate (and relinks the whole program
# with LTO: about 2.5 min on 2 cores, see the release profile in Cargo.toml). The image
# ships that plain release build; scripts/pgo-build.sh makes a faster binary in two
# builds and a training run, which this file does not do. `runtime` is
# debian:bookworm-slim with the binary and CA certificates (for the agent's wss://).
#
# This file is checked by tests/scripts.rs (its stages, user, port and command, and that
# the stub layer is a loadable workspace), but no image is built in this repository's
# tests: the machines that run them have no Docker engine.

# The toolchain the code is tested with; Debian bookworm like the runtime stage, so the
# binary links against the same glibc it runs on.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
# jemalloc, the binary's allocator, is built from source with make, which the slim
# image lacks (it has gcc and libc6-dev).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app

# Dependencies first: this layer and the next are reused until a manifest or Cargo.lock
# changes. Every workspace member's manifest is needed to load the workspace.
COPY Cargo.toml Cargo.lock ./
COPY relay/Cargo.toml relay/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
COPY tests/pattern/Cargo.toml tests/pattern/Cargo.toml
RUN mkdir -p relay/src/bin tests/support tests/pattern/src \
    && printf 'fn main() {}\n' > relay/src/bin/relay.rs \
    && printf '' > relay/src/lib.rs \
    && printf '' > tests/support/lib.rs \
    && printf '' > tests/pattern/src/lib.rs
RUN cargo build --release --locked -p relay --bin relay

# Then the relay's own code. COPY keeps the files' modification times, which can be
# older than the stub build above: touch the crate roots so cargo rebuilds the crate
# instead of keeping the stub's binary.
COPY relay relay
RUN touch relay/src/lib.rs relay/src/bin/relay.rs \
    && cargo build --release --locked -p relay --bin relay

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin relay
COPY --from=builder /app/target/release/relay /usr/local/bin/relay

USER 10001:10001
# `::` listens on IPv4 and IPv6: Fly's private network (peer relays bridging a WebSocket
# to this machine) is IPv6.
ENV RELAY_BIND=:: \
    RELAY_PORT=8080
EXPOSE 8080
# The relay drains on SIGINT or SIGTERM; SIGINT is also fly.toml's kill_signal.
STOPSIGNAL SIGINT
CMD ["relay", "serve"]
