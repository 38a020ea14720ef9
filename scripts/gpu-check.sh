#!/usr/bin/env bash
# GPU check (issues 7 and 26): run once on a machine with an NVIDIA GPU. Builds kiln with the `cuda`
# and `wgpu` features (wgpu reaches the GPU through the NVIDIA Vulkan driver),
# trains the smoke recipe on the GPU, checks that the sync interval does not change the summed loss
# there (1 vs 10), and runs `bench train` on the quickstart recipe in f32 (window reads overlapped
# with the next window, the default, and read at once), in bf16 and f16 and, with two GPUs or more, data
# parallel over two, then prints one table and
# writes it with the raw JSON under docs/bench/gpu/ (commit those files into docs/bench/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/bench/gpu
mkdir -p "$out"
log() { printf '== %s\n' "$*" >&2; }

log "build (cuda and wgpu features)"
cargo build --release --features cuda,wgpu 2>&1 | tail -1
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

bench() { # name, extra --set arguments...
  local name=$1; shift
  log "bench train, quickstart, $name on cuda:0"
  "$kiln" bench train recipes/quickstart.toml --set backend.device=cuda:0 "$@" --steps 200 --warmup 20 --no-peer \
    --json "$out/quickstart-$name.json" --out "$out/runs.md" --note "gpu-check $name" > "$scratch/bench-$name.log" 2>&1 \
    || { cat "$scratch/bench-$name.log"; echo "bench $name failed" > "$out/quickstart-$name.failed"; }
}
bench f32
bench f32-sync-at-once --set train.sync_overlap=false
bench bf16 --set train.precision=bf16
bench f16 --set train.precision=f16
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -ge 2 ]; then
  bench dp2 --set 'backend.devices=["cuda:0", "cuda:1"]'
else
  log "one GPU: no data-parallel bench"
fi

log "devices"
"$kiln" devices > "$out/devices.txt" 2>&1 || true
cat "$out/devices.txt" >&2
if grep -q '^wgpu:discrete:0 ' "$out/devices.txt"; then
  log "smoke recipe on wgpu:discrete:0 (Vulkan), then the sync bench there and on cuda:0"
  "$kiln" train recipes/smoke.toml --run-dir "$scratch/smoke-wgpu" --no-tui --set backend.device=wgpu:discrete:0 \
    --set loader.cache_dir="$scratch/cache" > "$scratch/smoke-wgpu.log" 2>&1 \
    && tail -3 "$scratch/smoke-wgpu.log" > "$out/smoke-wgpu.txt" || { tail -5 "$scratch/smoke-wgpu.log"; echo "wgpu smoke failed" > "$out/smoke-wgpu.txt"; }
  "$kiln" bench sync recipes/smoke-lm.toml --set backend.device=wgpu:discrete:0 --rounds 3 \
    --json "$out/sync-wgpu.json" --out "$out/sync.md" > "$scratch/sync-wgpu.log" 2>&1 || tail -5 "$scratch/sync-wgpu.log"
else
  echo "no discrete wgpu adapter (NVIDIA Vulkan driver missing?)" > "$out/smoke-wgpu.txt"
fi
"$kiln" bench sync recipes/smoke-lm.toml --set backend.device=cuda:0 --rounds 3 \
  --json "$out/sync-cuda.json" --out "$out/sync.md" > "$scratch/sync-cuda.log" 2>&1 || tail -5 "$scratch/sync-cuda.log"

commit=$(git rev-parse --short HEAD)
python3 - "$out" "$commit" "$exact" <<'PY' | tee "$out/table.md"
import json, os, sys
out, commit, exact = sys.argv[1:4]
gpu = open(f"{out}/gpu.txt").read().strip()
print(f"GPU: {gpu}; commit {commit}\n")
print(f"smoke, sync 1 vs 10: {exact}\n")
if os.path.exists(f"{out}/smoke-wgpu.txt"):
    print("smoke on wgpu (Vulkan): " + open(f"{out}/smoke-wgpu.txt").read().strip().replace("\n", " / ") + "\n")
if os.path.exists(f"{out}/sync.md"):
    print(open(f"{out}/sync.md").read())
print("| quickstart | tokens/s | step ms median / p90 | sync % | data wait % | peak host RSS MiB |")
print("|---|---|---|---|---|---|")
for name in ["f32", "f32-sync-at-once", "bf16", "f16", "dp2"]:
    path = f"{out}/quickstart-{name}.json"
    if name == "dp2" and not os.path.exists(path) and not os.path.exists(f"{out}/quickstart-dp2.failed"):
        continue
    if not os.path.exists(path):
        print(f"| {name} | failed (see the log above) | | | | |")
        continue
    k = json.load(open(path))["kiln"]
    print(f"| {name} | {k['tokens_per_s']:.0f} | {k['step_ms_median']:.1f} / {k['step_ms_p90']:.1f} | {k['sync_pct']:.2f} | {k['data_wait_pct']:.2f} | {k['peak_rss_mb']:.0f} |")
PY
