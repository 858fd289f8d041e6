#!/usr/bin/env bash
# The one prepared GPU run (docs/performance.md, "GPU run"): the CUDA exactness tests, then the
# incremental benchmark at products scale and on Online Retail, with a full_ratio sweep.
#
#   OUT=/tmp/gpu RETAIL=path/to/online_retail.csv.gz bash bench/gpu.sh
#   python bench/incremental.py --import-rows /tmp/gpu/gpu.json     # merge into bench/results
#
# It uses the machine's own python3 (torch with CUDA, torch-geometric, numpy, pytest,
# hypothesis) and needs nothing installed. Budget: about 8 minutes on an H200.
set -uo pipefail
OUT=${OUT:-/tmp/gpu}
RETAIL=${RETAIL:-.gpu/online_retail.csv.gz}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torch_geometric, numpy; print('torch', torch.__version__, 'pyg', torch_geometric.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

echo "== CUDA tests"
timeout "${TESTS_S:-150}" python3 -m pytest -q -x --noconftest -p no:cacheprovider \
    tests/streamer/embed/test_engine.py tests/streamer/embed/test_bounded.py -k cuda 2>&1 | tail -n 15 | tee "$OUT/cuda_tests.txt"

echo "== benchmark"
timeout "${BENCH_S:-420}" python3 bench/incremental.py --datasets synth:products,retail --device cuda \
    --retail "$RETAIL" --time-budget-s "${BUDGET_S:-330}" --khop-budget-s 6 --full-reps 3 \
    --sweep-full-ratio "${RATIOS:-0,0.005,0.02,0.1}" --output "$OUT/gpu.json" --fresh \
    2> >(tee "$OUT/bench.log" | grep -v '^{' >&2) > /dev/null
echo "bench exit $?"
python3 - "$OUT/gpu.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1])):
    k = r.get("kind")
    if k == "batch":
        print(r["dataset"], "B=%d" % r["batch_size"], "a=%.2fms b=%.1fms c=%.2fms a/b=%.1f c/a=%.2f upd/s=%.0f err=%.1e full_layers=%s"
              % (r["ms_incremental"], r["ms_khop"], r["ms_full"], r["speedup_vs_khop"], r["speedup_vs_full"],
                 r["updates_per_s"], r["max_abs_err"], r.get("full_layers")))
    elif k == "full_ratio_sweep":
        print("  sweep", r["dataset"], "B=%d" % r["batch_size"], "ratio=%g" % r["full_ratio"], "a=%.2fms" % r["ms_incremental"], r["full_layers"])
    elif k in ("hub", "hub_burst"):
        print("  ", k, r["case"], r["mode"], r.get("ms", r.get("ms_per_update")), "err=%.1e" % r["max_abs_err"])
EOF
