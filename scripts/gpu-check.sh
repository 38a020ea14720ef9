#!/usr/bin/env bash
# GPU check (issue 7): run once on a machine with an NVIDIA GPU. Builds kiln with the `cuda` feature,
# trains the smoke recipe on the GPU, checks that the sync interval does not change the summed loss
# there (1 vs 10), and runs `bench train` on the quickstart recipe, then prints one table and writes
# it with the raw JSON under docs/bench/gpu/ (commit those files into docs/bench/gpu.md by hand).
# Half precision is not implemented yet, so the bf16 row says so instead of measuring.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/bench/gpu
mkdir -p "$out"
log() { printf '== %s\n' "$*" >&2; }

log "build (cuda feature)"
cargo build --release --features cuda 2>&1 | tail -1
kiln=target/release/kiln
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" || echo "nvidia-smi unavailable" > "$out/gpu.txt"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

log "smoke recipe on cuda:0, sync every 1 and every 10 steps"
for n in 1 10; do
  "$kiln" train recipes/smoke.toml --run-dir "$scratch/smoke-$n" --no-tui \
    --set backend.device=cuda:0 --set train.sync_interval=$n --set loader.cache_dir="$scratch/cache" > "$scratch/smoke-$n.log"
done
exact=$(python3 - "$scratch" <<'PY'
import json, sys
a = json.load(open(f"{sys.argv[1]}/smoke-1/summary.json"))
b = json.load(open(f"{sys.argv[1]}/smoke-10/summary.json"))
rel = abs(a["train_loss"] - b["train_loss"]) / abs(a["train_loss"])
print(f'{a["steps"]} steps; train loss {a["train_loss"]:.6f} vs {b["train_loss"]:.6f} (rel {rel:.1e}); syncs {a["sync"]["count"]} vs {b["sync"]["count"]}; {"OK" if rel <= 1e-5 and a["steps"] == b["steps"] else "MISMATCH"}')
PY
)

log "bench train, quickstart, f32 on cuda:0"
"$kiln" bench train recipes/quickstart.toml --set backend.device=cuda:0 --steps 200 --warmup 20 --no-peer \
  --json "$out/quickstart-f32.json" --out "$out/runs.md" --note "gpu-check f32" > "$scratch/bench.log" 2>&1 || { cat "$scratch/bench.log"; exit 1; }
bf16=$("$kiln" bench train recipes/quickstart.toml --set backend.device=cuda:0 --set train.precision=bf16 --steps 10 --no-peer --out "$scratch/x.md" 2>&1 | tail -1 || true)

commit=$(git rev-parse --short HEAD)
python3 - "$out" "$commit" "$exact" "$bf16" <<'PY' | tee "$out/table.md"
import json, sys
out, commit, exact, bf16 = sys.argv[1:5]
k = json.load(open(f"{out}/quickstart-f32.json"))["kiln"]
gpu = open(f"{out}/gpu.txt").read().strip()
print(f"GPU: {gpu}; commit {commit}\n")
print("| check | result |\n|---|---|")
print(f"| smoke, sync 1 vs 10 | {exact} |")
print(f"| quickstart f32 tokens/s | {k['tokens_per_s']:.0f} |")
print(f"| step ms median / p90 | {k['step_ms_median']:.1f} / {k['step_ms_p90']:.1f} |")
print(f"| sync % / data wait % | {k['sync_pct']:.2f} / {k['data_wait_pct']:.2f} |")
print(f"| peak host RSS MiB | {k['peak_rss_mb']:.0f} |")
print(f"| quickstart bf16 | {bf16 or 'not run'} |")
PY
