# halfstep: OpenAI/vLLM-compatible FP16 inference server.
#
#   docker build -t halfstep .
#   scripts/fetch-default-model.sh          # puts the GGUF in ./models
#   docker run --rm -v "$PWD/models:/models" -p 8000:8000 halfstep
#
# The model is not part of the image: mount a directory holding it at /models.
# Any `halfstep serve` flags can follow the image name, replacing the CMD below, e.g.
#   docker run --rm -v "$PWD/models:/models" -p 8000:8000 halfstep \
#     /models/SmolLM2-135M-Instruct.Q4_1.gguf --host 0.0.0.0 --port 8000 --api-key secret

# ---- build ------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /app

# The whole workspace: every member must be present for Cargo to load it
# (trainer-client included, although only the server is built). tests/ holds the
# server's black-box test target (declared in server/Cargo.toml); it is not built
# here but keeps the manifest's paths valid.
COPY Cargo.toml Cargo.lock ./
COPY model ./model
COPY server ./server
COPY trainer-client ./trainer-client
COPY tests ./tests

RUN cargo build --release -p halfstep-server --locked

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid, so that `USER` is resolvable without /etc/passwd
# (e.g. Kubernetes runAsNonRoot) and host files can be granted to it.
RUN groupadd --system --gid 10001 halfstep \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/halfstep halfstep \
    && mkdir -p /models \
    && chown halfstep:halfstep /models

COPY --from=builder /app/target/release/halfstep /usr/local/bin/halfstep

USER 10001:10001
WORKDIR /home/halfstep

EXPOSE 8000
VOLUME /models

ENTRYPOINT ["halfstep", "serve"]
CMD ["/models/SmolLM2-135M-Instruct.Q4_1.gguf", "--host", "0.0.0.0", "--port", "8000"]
