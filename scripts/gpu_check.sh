#!/usr/bin/env bash
# GPU check of ril-pipe: a smoke pipeline on CUDA and the last-step training update at the full
# SD1.5 UNet config timed against PyTorch eager.
#
# It runs on a machine with an NVIDIA GPU and its own PyTorch 2.11 (for example
# /opt/torch/.venv), with a ril-pipe binary built elsewhere, so nothing is compiled there.
#
# 1. On the build machine (no GPU needed), from the repository root:
#
#      scripts/gpu_check.sh prepare
#
#    which does what these commands do:
#
#      . scripts/dev-env.sh && cargo build --bin ril-pipe
#      mkdir -p .ril-pipe/gpu-check
#      strip -o .ril-pipe/gpu-check/ril-pipe "$CARGO_TARGET_DIR/debug/ril-pipe"
#      xz -T0 -6 -f .ril-pipe/gpu-check/ril-pipe            # -> ril-pipe.xz, about 12 MB
#      tar -C "$RIL_FIXTURES/world" -cJf .ril-pipe/gpu-check/world.tar.xz random   # about 17 MB
#
#    (`make fixtures` first if $RIL_FIXTURES/world/random is missing.) Carry the folder
#    .ril-pipe/gpu-check (ignored by git) to the GPU machine with the working tree.
#
# 2. On the GPU machine, from the repository root:
#
#      scripts/gpu_check.sh run [--python /opt/torch/.venv/bin/python] [--out DIR] [--device cuda:0]
#
#    It sets LD_LIBRARY_PATH to that PyTorch's torch/lib (the binary links libtorch
#    dynamically), then
#    a. runs a smoke pipeline on the random-world fixture (or tiny/weights when it exists) on the
#       GPU: RID fine-tunes in fp32 and fp16, a baseline fine-tune on top, evaluations in both
#       precisions; checks that it succeeds, that the adapters and the EMA teacher are fp32,
#       that training values and metrics are finite, that the stages logged their device,
#       precision and memory estimate, and that an fp32 fine-tune on the GPU follows the CPU one
#       (same seed, same noise: the noise is drawn on the CPU);
#    b. times one baseline and one RID step at the SD1.5 UNet config (random weights, 64x64
#       latents as for 512x512 images, fp16 frozen UNet, micro-batch 4 prompts = 8 UNet
#       samples with guidance) with `ril-pipe bench-step` and with PyTorch eager
#       (scripts/gpu_step_torch.py: diffusers UNet2DConditionModel and a reference LoRA
#       wrapper), and prints the times, their ratio, the peak memory of each and ril-pipe's
#       estimate. Part b needs diffusers in that Python; without it, it is skipped with a note.
#    Results (logs, JSON lines, summary.txt) go to --out (default: $OUT when set, else
#    ./gpu-check-out). Exit status: 0 when every check passed, 1 otherwise.
#
#    `scripts/gpu_check.sh run --device cpu --quick` runs the same steps on the CPU with a tiny
#    UNet (bf16 instead of fp16), to check the script itself on a machine without a GPU.
#
# Status: written and exercised on the CPU only (`run --device cpu --quick`); it has not been
# run on a GPU yet.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$ROOT/.ril-pipe/gpu-check"

die() { echo "gpu_check: $*" >&2; exit 2; }

prepare() {
    cd "$ROOT" || die "no repository root"
    # shellcheck source=/dev/null
    . scripts/dev-env.sh
    cargo build --bin ril-pipe || die "cargo build failed"
    mkdir -p "$KIT"
    strip -o "$KIT/ril-pipe" "$CARGO_TARGET_DIR/debug/ril-pipe" || die "strip failed"
    xz -T0 -6 -f "$KIT/ril-pipe" || die "xz failed"
    local world="$RIL_FIXTURES/world/random"
    [ -f "$world/world.json" ] || die "$world is missing: run \`make fixtures\`"
    tar -C "$RIL_FIXTURES/world" -cJf "$KIT/world.tar.xz" random || die "tar failed"
    ls -l "$KIT"
    echo "carry: .ril-pipe/gpu-check"
}

PYTHON=""
OUT_DIR="${OUT:-$ROOT/gpu-check-out}"
# The unpacked binary, the world and the caches: kept out of OUT_DIR, which holds what to read.
WORK="${TMPDIR:-/tmp}/ril-pipe-gpu-check.$$"
DEVICE="cuda"
QUICK=0
FAILURES=()

fail() { FAILURES+=("$1"); echo "FAIL: $1"; }
ok() { echo "ok: $1"; }

find_python() {
    if [ -n "$PYTHON" ]; then
        [ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null || die "--python $PYTHON is not executable"
        return
    fi
    for candidate in /opt/torch/.venv/bin/python "${VIRTUAL_ENV:-/nonexistent}/bin/python" python3 python; do
        if { [ -x "$candidate" ] || command -v "$candidate" >/dev/null 2>&1; } && "$candidate" -c "import torch" 2>/dev/null; then
            PYTHON="$candidate"
            return
        fi
    done
    die "no Python with torch found: pass --python PATH (a Python whose torch is 2.11)"
}

run_checks() {
    find_python
    mkdir -p "$OUT_DIR" "$WORK" || die "cannot create $OUT_DIR and $WORK"
    trap 'rm -rf "$WORK"' EXIT
    local log="$OUT_DIR/gpu_check.log"
    exec > >(tee "$log") 2>&1
    echo "== environment"
    date -u
    "$PYTHON" - <<'EOF'
import os, sys, torch
print("python", sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name} {p.total_memory / 1e9:.1f} GB")
if not torch.__version__.startswith("2.11"):
    print(f"WARNING: ril-pipe links libtorch 2.11 (tch 0.24); this is torch {torch.__version__}")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv
    local torch_lib
    torch_lib="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" || die "cannot locate torch/lib"
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

    local bin="$WORK/ril-pipe"
    if [ -f "$KIT/ril-pipe.xz" ]; then
        xz -dc "$KIT/ril-pipe.xz" > "$bin" && chmod +x "$bin" || die "cannot unpack $KIT/ril-pipe.xz"
    elif [ -x "$KIT/ril-pipe" ]; then
        cp "$KIT/ril-pipe" "$bin"
    else
        die "no binary in $KIT: run \`scripts/gpu_check.sh prepare\` on the build machine and carry .ril-pipe/gpu-check"
    fi
    if ldd "$bin" | grep -q "not found"; then
        ldd "$bin" | grep "not found"
        die "libraries missing for the binary (is $torch_lib a PyTorch 2.11?)"
    fi
    ldd "$bin" | grep -E "libtorch_cuda|libc10_cuda" || echo "note: the binary does not link libtorch_cuda (CUDA will read as unavailable)"
    "$bin" --version || die "the binary does not start"

    local world
    if [ -f "$ROOT/tiny/weights/world.json" ]; then
        world="$ROOT/tiny/weights"
    elif [ -f "$KIT/world.tar.xz" ]; then
        mkdir -p "$WORK/world" && tar -C "$WORK/world" -xJf "$KIT/world.tar.xz" || die "cannot unpack the world"
        world="$WORK/world/random"
    else
        die "no world: neither tiny/weights nor $KIT/world.tar.xz"
    fi
    echo "world: $world"

    local half=fp16
    [ "$DEVICE" = cpu ] && half=bf16
    smoke "$bin" "$world" "$half"
    timing "$bin" "$half"

    echo
    echo "== summary"
    {
        if [ ${#FAILURES[@]} -eq 0 ]; then
            echo "all checks passed"
        else
            printf 'FAILED: %s\n' "${FAILURES[@]}"
        fi
    } | tee "$OUT_DIR/summary.txt"
    [ ${#FAILURES[@]} -eq 0 ]
}

smoke() {
    local bin="$1" world="$2" half="$3"
    echo
    echo "== smoke pipeline on $DEVICE ($half and fp32)"
    local dir="$OUT_DIR/smoke"
    rm -rf "$dir" && mkdir -p "$dir"
    # smoke_cpu.yaml repeats the fp32 fine-tune alone, for the comparison on the CPU.
    local head="defaults:
  finetune: {epochs: 1, prompts_per_epoch: 4, batch_size: 2, micro_batch: 1, lr: 1.0e-2, ddim_steps: 3, guidance: 2.0, lora_rank: 2}
  evaluate: {images_per_prompt: 2, ddim_steps: 3, guidance: 2.0, batch_size: 4}
stages:
  - id: base
    kind: tiny_world
    params: {root: \"$world\"}"
    printf '%s\n%s\n' "$head" '  - id: ft/fp32
    kind: finetune
    inputs: {model: base}
    params: {task: aesthetic, method: rid, precision: fp32}' > "$dir/smoke_cpu.yaml"
    cat > "$dir/smoke.yaml" <<EOF
$head
  - id: ft/\${precision}
    kind: finetune
    matrix: {precision: [fp32, $half]}
    inputs: {model: base}
    params: {task: aesthetic, method: rid, precision: "\${precision}"}
  - id: ft2
    kind: finetune
    inputs: {model: ft/$half}
    params: {task: compress, method: baseline, precision: $half}
  - id: eval/\${precision}
    kind: evaluate
    matrix: {precision: [fp32, $half]}
    inputs: {model: ft2}
    params: {precision: "\${precision}"}
EOF
    "$bin" plan "$dir/smoke.yaml" --cache "$dir/cache" | tee "$dir/plan.txt"
    grep -q "peak" "$dir/plan.txt" && ok "plan shows peak-memory estimates" || fail "plan shows no peak-memory estimate"
    if "$bin" run "$dir/smoke.yaml" --cache "$dir/cache" --device "$DEVICE" --no-progress; then
        ok "smoke pipeline ran on $DEVICE"
    else
        fail "smoke pipeline on $DEVICE"
        for f in "$dir"/cache/logs/*; do [ -f "$f" ] && { echo "--- $f"; tail -n 30 "$f"; }; done
        return
    fi
    for id in ft/fp32 ft/$half ft2 eval/fp32 eval/$half; do
        "$bin" export "$dir/smoke.yaml" --cache "$dir/cache" --stage "$id" --to "$dir/out/$id" >/dev/null || fail "export $id"
    done
    "$bin" plan "$dir/smoke.yaml" --cache "$dir/cache" --json > "$dir/plan.json" || fail "plan --json"
    "$PYTHON" - "$dir/out" "$half" "$DEVICE" "$dir/plan.json" "$dir/cache" <<'EOF' && ok "smoke outputs (dtypes, finite values, logs)" || fail "smoke outputs"
import json, math, pathlib, struct, sys
out, half, device = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
keys = {s["id"]: s["key"] for s in json.loads(pathlib.Path(sys.argv[4]).read_text())["stages"]}
cache = pathlib.Path(sys.argv[5])
def stage_log(stage):
    # Logs stay in the cache with each object (export copies the outputs only).
    key = keys[stage]
    return (cache / "objects" / key[:2] / key / "log.txt").read_text()
def header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}
bad = []
want = "cuda" if device.startswith("cuda") else "cpu"
for stage in ("ft/fp32", f"ft/{half}", "ft2"):
    for name in ("adapters.safetensors", "teacher.safetensors"):
        path = out / stage / name
        if not path.exists():
            continue
        for tensor, info in header(path).items():
            if tensor != "lora_scales" and info["dtype"] != "F32":
                bad.append(f"{stage}/{name}: {tensor} is {info['dtype']}")
    for line in (out / stage / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if not all(math.isfinite(rec[k]) for k in ("reward", "loss", "grad_norm")):
            bad.append(f"{stage}: non-finite training values {rec}")
    log = stage_log(stage)
    print(f"--- {stage}/log.txt"); print(log)
    if want not in log.lower() or "estimated peak memory" not in log:
        bad.append(f"{stage}: the log does not name the device or the memory estimate")
    if device.startswith("cuda") and "free" not in log and "unknown" not in log:
        bad.append(f"{stage}: no free-memory check in the log")
for stage in ("eval/fp32", f"eval/{half}"):
    log = stage_log(stage)
    if want not in log.lower() or "estimated peak memory" not in log:
        bad.append(f"{stage}: the log does not name the device or the memory estimate")
    metrics = json.loads((out / stage / "metrics.json").read_text())
    print(stage, json.dumps(metrics.get("metrics", metrics)))
    values = metrics.get("metrics", {})
    if not values or not all(math.isfinite(v) for v in values.values()):
        bad.append(f"{stage}: metrics missing or not finite")
a = json.loads((out / "eval/fp32/metrics.json").read_text())["metrics"]
b = json.loads((out / f"eval/{half}/metrics.json").read_text())["metrics"]
for k in a:
    print(f"{k}: fp32 {a[k]:.5f} {half} {b[k]:.5f}")
print("\n".join(bad) or "no problems")
sys.exit(1 if bad else 0)
EOF
    if [ "$DEVICE" != cpu ]; then
        # The same fp32 fine-tune on the CPU: the noise is the same, so rewards must agree closely.
        "$bin" run "$dir/smoke_cpu.yaml" --cache "$dir/cache-cpu" --device cpu --no-progress >/dev/null 2>&1 \
            && "$bin" export "$dir/smoke_cpu.yaml" --cache "$dir/cache-cpu" --stage ft/fp32 --to "$dir/out-cpu/ft/fp32" >/dev/null \
            || { fail "fp32 fine-tune on the CPU"; return; }
        "$PYTHON" - "$dir/out/ft/fp32/train_log.jsonl" "$dir/out-cpu/ft/fp32/train_log.jsonl" <<'EOF' && ok "fp32 fine-tune on $DEVICE follows the CPU one" || fail "fp32 fine-tune on $DEVICE differs from the CPU one"
import json, sys
gpu = [json.loads(l) for l in open(sys.argv[1])]
cpu = [json.loads(l) for l in open(sys.argv[2])]
worst = 0.0
for g, c in zip(gpu, cpu):
    rel = abs(g["reward"] - c["reward"]) / max(abs(c["reward"]), 1e-6)
    worst = max(worst, rel)
    print(f"step {g['step']}: reward gpu {g['reward']:.6f} cpu {c['reward']:.6f}; grad norm gpu {g['grad_norm']:.4e} cpu {c['grad_norm']:.4e}")
print(f"largest relative reward difference {worst:.2e}")
sys.exit(0 if len(gpu) == len(cpu) and worst < 1e-2 else 1)
EOF
    fi
}

timing() {
    local bin="$1" half="$2"
    echo
    echo "== last-step training update: ril-pipe (tch) against PyTorch eager"
    local dir="$OUT_DIR/timing"
    mkdir -p "$dir"
    local unet=sd15 latent=64 micro=4 steps=10 warmup=3
    if [ "$QUICK" = 1 ]; then
        unet="$dir/tiny_unet.json"
        cat > "$unet" <<'EOF'
{"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "attention_head_dim": 4,
 "cross_attention_dim": 32, "norm_num_groups": 32, "sample_size": 8}
EOF
        latent=8 micro=2 steps=2 warmup=1
    fi
    local common=(--unet "$unet" --latent "$latent" --micro "$micro" --precision "$half" --device "$DEVICE" --steps "$steps" --warmup "$warmup")
    local torch_ok=1
    local missing
    missing="$("$PYTHON" -c '
import importlib.util
print(" ".join(m for m in ("diffusers",) if importlib.util.find_spec(m) is None))')"
    if [ -n "$missing" ]; then
        echo "note: the PyTorch side needs the python package(s) [$missing] in $PYTHON (pip install $missing); it is skipped"
        torch_ok=0
    fi
    : > "$dir/results.jsonl"
    for method in baseline rid; do
        if "$bin" bench-step "${common[@]}" --method "$method" > "$dir/tch_$method.json"; then
            cat "$dir/tch_$method.json" >> "$dir/results.jsonl"
        else
            fail "ril-pipe bench-step --method $method"
        fi
        if [ "$torch_ok" = 1 ]; then
            if "$PYTHON" "$ROOT/scripts/gpu_step_torch.py" "${common[@]}" --method "$method" > "$dir/torch_$method.json"; then
                cat "$dir/torch_$method.json" >> "$dir/results.jsonl"
            else
                fail "PyTorch step --method $method"
            fi
        fi
    done
    "$PYTHON" - "$dir" <<'EOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
def load(name):
    p = d / name
    try:
        return json.loads(p.read_text().strip().splitlines()[-1])
    except Exception:
        return None
gb = lambda b: "-" if b is None else f"{b / 1e9:.2f} GB"
print(f"{'method':9} {'tch ms':>9} {'torch ms':>9} {'ratio':>6} {'tch mem':>9} {'torch mem':>9} {'torch alloc':>11} {'estimate':>9}")
for method in ("baseline", "rid"):
    t, p = load(f"tch_{method}.json"), load(f"torch_{method}.json")
    if t is None:
        print(f"{method:9} (ril-pipe side failed)")
        continue
    tm = t["median_s"] * 1e3
    pm = p["median_s"] * 1e3 if p else None
    ratio = f"{tm / pm:.3f}" if pm else "-"
    print(f"{method:9} {tm:9.1f} {pm if pm is None else round(pm, 1)!s:>9} {ratio:>6} {gb(t.get('peak_memory_bytes')):>9} "
          f"{gb(p.get('peak_memory_bytes') if p else None):>9} {gb(p.get('max_memory_allocated') if p else None):>11} {gb(t.get('estimate_bytes')):>9}")
    if p and t["lora_parameters"] != p["lora_parameters"]:
        print(f"  note: LoRA parameters differ: tch {t['lora_parameters']}, torch {p['lora_parameters']}")
print("ratio = tch / torch median step time; memory = device memory in use after the steps minus before (cudaMemGetInfo, "
      "caching allocator reserve included); torch alloc = torch.cuda.max_memory_allocated; estimate = ril-pipe's formula")
EOF
}

case "${1:-}" in
    prepare)
        prepare
        ;;
    run)
        shift
        while [ $# -gt 0 ]; do
            case "$1" in
                --python) PYTHON="${2:?--python needs a path}"; shift 2 ;;
                --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
                --device) DEVICE="${2:?--device needs cpu, cuda or cuda:N}"; shift 2 ;;
                --quick) QUICK=1; shift ;;
                *) die "unknown option $1 (see the header of $0)" ;;
            esac
        done
        run_checks
        ;;
    *)
        sed -n '2,48p' "$0"
        exit 2
        ;;
esac
