#!/usr/bin/env bash
# Installs the Cypher linter (tools/cypher-lint: @neo4j-cypher/language-support, pinned in its
# package-lock.json) that tests/sinks/test_cypher_lint.py runs. Idempotent: does nothing when
# the pinned version is already installed; pass --force to reinstall. Needs node >= 20 and npm.
# The package declares node >= 24.11.1 but runs on node 20; npm's engine warning is silenced.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/tools/cypher-lint"
pkg="@neo4j-cypher/language-support"

for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "install_cypher_lint: '$tool' not found (need node >= 20 and npm)" >&2; exit 1; }
done
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if (( node_major < 20 )); then
  echo "install_cypher_lint: node $(node --version) is too old (need >= 20)" >&2
  exit 1
fi

version_of() {  # the "version" field of a JSON file's packages entry, or of a package.json
  node -e '
    const fs = require("fs");
    const [file, key] = process.argv.slice(1);
    try {
      const doc = JSON.parse(fs.readFileSync(file, "utf8"));
      process.stdout.write(String(key ? doc.packages[key].version : doc.version));
    } catch { }' "$@"
}

wanted="$(version_of "$dir/package-lock.json" "node_modules/$pkg")"
installed="$(version_of "$dir/node_modules/$pkg/package.json")"

if [[ "${1:-}" != "--force" && -n "$wanted" && "$installed" == "$wanted" \
      && "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ]]; then
  exit 0
fi

npm ci --prefix "$dir" --no-audit --no-fund --engine-strict=false --loglevel=error >/dev/null
node "$dir/lint.mjs" --schema >/dev/null   # smoke test: the package loads and lints
