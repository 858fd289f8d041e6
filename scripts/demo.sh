#!/usr/bin/env bash
# The main job on embedded defaults, from a fresh clone: set up, start a local Kafka-protocol
# broker and a Bolt graph DB, replay the committed real sample, ingest until caught up, train
# the graph model on it, embed with the trained model, audit, and print a summary with
# recommendations for one user and similar products for one product (with titles).
# Run it again and it reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec kg-streamer demo "$@"
