#!/usr/bin/env bash
# Installs one of the node tools the tests run, pinned by its package-lock.json:
#   scripts/install_node_tool.sh tools/cypher-lint      (Neo4j's Cypher linter: tests/sinks/test_cypher_lint.py)
#   scripts/install_node_tool.sh tools/k8s-validate     (CRD schemas for ops/k8s: tests/ops/test_k8s.py)
# Idempotent: does nothing when the locked versions are already installed; --force reinstalls.
# Needs node >= 20 and npm. Some packages declare a newer node but run on 20; npm's engine
# warning is silenced. A smoke run (the tool with empty input) checks that it loads.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/${1:?usage: install_node_tool.sh tools/<name> [--force]}"
[ -f "$dir/package-lock.json" ] || { echo "install_node_tool: $dir/package-lock.json not found" >&2; exit 1; }

for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "install_node_tool: '$tool' not found (need node >= 20 and npm)" >&2; exit 1; }
done
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if (( node_major < 20 )); then
  echo "install_node_tool: node $(node --version) is too old (need >= 20)" >&2
  exit 1
fi

# installed already: npm's own record of the tree is newer than the lock file it came from
if [[ "${2:-}" != "--force" && "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ]]; then
  exit 0
fi

npm ci --prefix "$dir" --no-audit --no-fund --engine-strict=false --loglevel=error >/dev/null
case "$(basename "$dir")" in  # smoke test: the tool loads and answers
  cypher-lint) node "$dir/lint.mjs" --schema >/dev/null ;;
  k8s-validate) echo '[]' | node "$dir/validate.mjs" >/dev/null ;;
esac
