#!/usr/bin/env bash
# The main job on embedded defaults, from a fresh clone: set up, start a local Kafka-protocol
# broker and a Bolt graph DB, replay the committed real sample, ingest until caught up, embed,
# and print a summary. Run it again and it reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec kg-streamer demo "$@"
