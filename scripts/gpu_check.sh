#!/usr/bin/env bash
# GPU check of ril-pipe, one prepared run on a lent GPU machine: the smoke pipeline on CUDA, and
# the last-step training update at the SD1.5 configs timed against PyTorch eager, with peak
# memory against ril-pipe's estimate, and the projected minutes per epoch.
#
# It runs on a machine with an NVIDIA GPU and its own PyTorch 2.11 (for example
# /opt/torch/.venv), with a ril-pipe binary built elsewhere, so nothing is compiled there and
# nothing is downloaded.
#
# 1. On the build machine (no GPU needed), from the repository root:
#
#      scripts/gpu_check.sh prepare
#
#    builds the release binary, strips and xz-compresses it into .ril-pipe/gpu-check/ (ignored
#    by git; about 15 MB), and puts there the wheels of diffusers and of its requirements (pure
#    Python, and Pillow for CPython 3.12), downloaded from the package registry with the venv's
#    pip. Carry .ril-pipe/gpu-check with the working tree (the tiny world, tiny/weights, is in it).
#
# 2. On the GPU machine, from the repository root:
#
#      scripts/gpu_check.sh run [--python /opt/torch/.venv/bin/python] [--out DIR] [--device cuda:0]
#
#    It points LD_LIBRARY_PATH at that PyTorch's torch/lib (the binary links libtorch
#    dynamically), unpacks into a temporary folder the wheels of whatever diffusers needs that
#    this Python lacks, then
#    a. runs the smoke pipeline on the tiny world on the GPU: RID fine-tunes in fp32 and fp16, a
#       baseline fine-tune on top, evaluations in both precisions; checks that it succeeds, that
#       the adapters and the EMA teacher are fp32, that training values and metrics are finite,
#       that the stages logged their device, precision and memory estimate, and that the fp32
#       fine-tune on the GPU follows the same one on the CPU (rewards within 1% relative; the
#       noise is drawn on the CPU, so both see the same);
#    b. times one baseline and one RID update (RID: image-space last-step distillation) at the
#       SD1.5 UNet and VAE configs and the aesthetic reward's CLIP ViT-L/14 (random weights,
#       512x512 pixels = 64x64 latents, fp16 frozen models, fp32 LoRA, guidance 7.5), at
#       micro-batch 1, 4 and 8, with and without gradient checkpointing, with `ril-pipe
#       bench-step` (one process per measurement, for its memory) and with PyTorch eager
#       (scripts/gpu_step_torch.py: diffusers, transformers and a reference LoRA wrapper), plus
#       one guided UNet call without gradient (a sampling step);
#    c. writes gpu_check.json (device, driver, CUDA, torch, date, one object per measurement,
#       the projected minutes per epoch per method, the goals reached or not) and gpu_check.md
#       (the table for docs/gpu.md) into --out.
#    Results and logs go to --out (default: $OUT when set, else ./gpu-check-out). Exit status: 0
#    when every check passed, 1 otherwise (the timing goals are reported, not checked).
#
#    `scripts/gpu_check.sh run --device cpu --quick` runs the same steps on the CPU with tiny
#    models (bf16 instead of fp16), to check the script itself on a machine without a GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$ROOT/.ril-pipe/gpu-check"

die() { echo "gpu_check: $*" >&2; exit 2; }

# diffusers and what it requires beyond torch, transformers and their requirements (which the
# GPU machine's Python has), at the versions of the test venv.
WHEELS="diffusers importlib_metadata zipp filelock requests charset_normalizer idna urllib3 certifi pillow"

prepare() {
    cd "$ROOT" || die "no repository root"
    # shellcheck source=/dev/null
    . scripts/dev-env.sh
    cargo build --release --bin ril-pipe || die "cargo build failed"
    rm -rf "$KIT" && mkdir -p "$KIT/wheels"
    strip -o "$KIT/ril-pipe" "$CARGO_TARGET_DIR/release/ril-pipe" || die "strip failed"
    xz -T0 -6 -f "$KIT/ril-pipe" || die "xz failed"
    local pins=() name version
    for name in $WHEELS; do
        version="$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")" || die "$name is not in the venv: run \`make setup\`"
        pins+=("$name==$version")
    done
    python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --abi cp312 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        --dest "$KIT/wheels" "${pins[@]}" || die "pip download failed"
    ls -l "$KIT" "$KIT/wheels"
    du -sh "$KIT"
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

# Unpacks the carried wheels of what diffusers needs and this Python lacks into $WORK/python and
# puts that first on PYTHONPATH (a wheel is a zip of importable files: no pip, no network).
python_packages() {
    echo "== python packages for the PyTorch side"
    local missing
    missing="$("$PYTHON" - $WHEELS <<'EOF'
import importlib.util, sys
modules = {"pillow": "PIL", "charset_normalizer": "charset_normalizer", "importlib_metadata": "importlib_metadata"}
print(" ".join(n for n in sys.argv[1:] if importlib.util.find_spec(modules.get(n, n)) is None))
EOF
)"
    echo "missing in $PYTHON: ${missing:-nothing}"
    [ -n "$missing" ] || return 0
    mkdir -p "$WORK/python"
    local name wheel
    for name in $missing; do
        wheel="$(ls "$KIT/wheels/" 2>/dev/null | grep -i "^${name//-/_}-" | head -n 1)"
        if [ -z "$wheel" ]; then
            echo "note: no wheel of $name in $KIT/wheels"
            continue
        fi
        "$PYTHON" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$KIT/wheels/$wheel" "$WORK/python" || fail "unpack $wheel"
    done
    export PYTHONPATH="$WORK/python${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -c "import diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)" || fail "diffusers does not import"
}

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
    "$PYTHON" - "$OUT_DIR/env.json" <<'EOF'
import datetime, json, subprocess, sys, torch
env = {"python": sys.executable, "torch": torch.__version__, "cuda": torch.version.cuda,
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "cuda_available": torch.cuda.is_available(), "device": "cpu", "driver": None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env["device"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB"
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    if smi.returncode == 0 and smi.stdout.strip():
        name, driver, memory = [x.strip() for x in smi.stdout.strip().splitlines()[0].split(",")]
        env.update({"device": f"{name}, {memory}", "driver": driver})
    header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    if "CUDA Version:" in header:
        env["cuda_driver_api"] = header.split("CUDA Version:")[1].split()[0]
except (OSError, subprocess.SubprocessError):
    pass
print(json.dumps(env, indent=1))
if not torch.__version__.startswith("2.11"):
    print(f"WARNING: ril-pipe links libtorch 2.11 (tch 0.24); this is torch {torch.__version__}")
open(sys.argv[1], "w").write(json.dumps(env))
EOF
    local torch_lib
    torch_lib="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" || die "cannot locate torch/lib"
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

    python_packages

    local bin="$WORK/ril-pipe"
    if [ -f "$KIT/ril-pipe.xz" ]; then
        { xz -dc "$KIT/ril-pipe.xz" > "$bin" 2>/dev/null \
            || "$PYTHON" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$KIT/ril-pipe.xz" "$bin"; } \
            && chmod +x "$bin" || die "cannot unpack $KIT/ril-pipe.xz"
    elif [ -x "$KIT/ril-pipe" ]; then
        cp "$KIT/ril-pipe" "$bin"
    else
        die "no binary in $KIT: run \`scripts/gpu_check.sh prepare\` on the build machine and carry .ril-pipe/gpu-check"
    fi
    if command -v ldd >/dev/null && ldd "$bin" | grep -q "not found"; then
        ldd "$bin" | grep "not found"
        die "libraries missing for the binary (is $torch_lib a PyTorch 2.11?)"
    fi
    command -v ldd >/dev/null && { ldd "$bin" | grep -E "libtorch_cuda|libc10_cuda" || echo "note: the binary does not link libtorch_cuda (CUDA will read as unavailable)"; }
    "$bin" --version || die "the binary does not start"

    local world="$ROOT/tiny/weights"
    [ -f "$world/world.json" ] || die "no tiny world at $world"
    echo "world: $world"

    local half=fp16
    [ "$DEVICE" = cpu ] && half=bf16
    local started=$SECONDS
    smoke "$bin" "$world" "$half"
    echo "(smoke: $((SECONDS - started)) s)"
    started=$SECONDS
    timing "$bin" "$half"
    echo "(timing: $((SECONDS - started)) s)"
    report

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
        "$PYTHON" - "$dir/out/ft/fp32/train_log.jsonl" "$dir/out-cpu/ft/fp32/train_log.jsonl" "$dir/comparison.json" "$dir/out" "$half" <<'EOF' && ok "fp32 fine-tune on $DEVICE follows the CPU one" || fail "fp32 fine-tune on $DEVICE differs from the CPU one"
import json, pathlib, sys
gpu = [json.loads(l) for l in open(sys.argv[1])]
cpu = [json.loads(l) for l in open(sys.argv[2])]
worst_reward = worst_grad = 0.0
for g, c in zip(gpu, cpu):
    worst_reward = max(worst_reward, abs(g["reward"] - c["reward"]) / max(abs(c["reward"]), 1e-6))
    worst_grad = max(worst_grad, abs(g["grad_norm"] - c["grad_norm"]) / max(abs(c["grad_norm"]), 1e-12))
    print(f"step {g['step']}: reward gpu {g['reward']:.6f} cpu {c['reward']:.6f}; grad norm gpu {g['grad_norm']:.4e} cpu {c['grad_norm']:.4e}")
print(f"largest relative difference: reward {worst_reward:.2e}, gradient norm {worst_grad:.2e} (tolerance: reward 1e-2)")
out, half = pathlib.Path(sys.argv[4]), sys.argv[5]
metrics = {p: json.loads((out / f"eval/{p}/metrics.json").read_text()).get("metrics") for p in ("fp32", half)}
ok = len(gpu) == len(cpu) and worst_reward < 1e-2
pathlib.Path(sys.argv[3]).write_text(json.dumps({"fp32_gpu_vs_cpu": {"steps": len(gpu), "reward_rel_max": worst_reward, "grad_norm_rel_max": worst_grad,
    "tolerance_reward_rel": 1e-2, "passed": ok}, "eval_metrics": metrics}))
sys.exit(0 if ok else 1)
EOF
    fi
}

timing() {
    local bin="$1" half="$2"
    echo
    echo "== last-step training update: ril-pipe (tch) against PyTorch eager"
    local dir="$OUT_DIR/timing"
    mkdir -p "$dir"
    local models=(--unet sd15 --vae sd15 --clip vit-l14 --resolution 512) micros="1 4 8" steps=5 warmup=2
    if [ "$QUICK" = 1 ]; then
        local configs="$ROOT/benches/configs"
        models=(--unet "$configs/tiny_unet.json" --vae "$configs/tiny_vae.json" --clip "$configs/tiny_clip_vision.json" --resolution 16)
        micros="1 2" steps=2 warmup=1
    fi
    local common=("${models[@]}" --precision "$half" --device "$DEVICE" --steps "$steps" --warmup "$warmup")
    local torch_ok=1
    "$PYTHON" -c "import diffusers, transformers" 2>/dev/null || { echo "note: diffusers or transformers does not import: the PyTorch side is skipped"; torch_ok=0; }
    : > "$dir/results.jsonl"
    local method ckpt micro flags
    for method in baseline rid; do
        for ckpt in 0 1; do
            flags=(--method "$method")
            [ "$ckpt" = 1 ] && flags+=(--checkpointing --decode-chunk 1)
            for micro in $micros; do
                if timeout 180 "$bin" bench-step "${common[@]}" "${flags[@]}" --micro "$micro" >> "$dir/results.jsonl" 2>> "$dir/ril.err"; then
                    tail -n 1 "$dir/results.jsonl"
                else
                    fail "ril-pipe bench-step ${flags[*]} --micro $micro"
                    tail -n 5 "$dir/ril.err"
                fi
            done
            if [ "$torch_ok" = 1 ]; then
                if timeout 300 "$PYTHON" "$ROOT/scripts/gpu_step_torch.py" "${common[@]}" "${flags[@]}" --micro "${micros// /,}" >> "$dir/results.jsonl" 2>> "$dir/torch.err"; then
                    tail -n "$(wc -w <<< "$micros")" "$dir/results.jsonl"
                else
                    fail "PyTorch step ${flags[*]}"
                    tail -n 5 "$dir/torch.err"
                fi
            fi
        done
    done
}

# gpu_check.json and gpu_check.md from env.json, the smoke outputs and timing/results.jsonl.
report() {
    echo
    echo "== report"
    "$PYTHON" - "$OUT_DIR" "${FAILURES[@]}" <<'EOF' || fail "report"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
failures = sys.argv[2:]
env = json.loads((out / "env.json").read_text())
rows = [json.loads(l) for l in (out / "timing/results.jsonl").read_text().splitlines() if l.strip().startswith("{")]
def find(side, method, micro, ckpt):
    return next((r for r in rows if r.get("side") == side and r["method"] == method and r["micro_batch"] == micro and r["checkpointing"] == ckpt), None)
gb = lambda b: None if b is None else round(b / 1e9, 3)
measurements = []
for r in rows:
    if r.get("side") != "ril-pipe":
        continue
    t = find("pytorch", r["method"], r["micro_batch"], r["checkpointing"])
    ms_ril, ms_torch = r["median_s"] * 1e3, (t["median_s"] * 1e3 if t else None)
    peak, estimate = gb(r.get("peak_memory_bytes")), gb(r["estimate_bytes"])
    measurements.append({
        "name": f"{r['method']} step, micro-batch {r['micro_batch']}" + (", checkpointing" if r["checkpointing"] else ""),
        "method": r["method"], "micro_batch": r["micro_batch"], "checkpointing": r["checkpointing"],
        "ms_ril": round(ms_ril, 2), "ms_torch": None if ms_torch is None else round(ms_torch, 2),
        "ratio": None if not ms_torch else round(ms_ril / ms_torch, 3),
        "sample_ms_ril": round(r["sample_step_s"] * 1e3, 2), "sample_ms_torch": None if not t else round(t["sample_step_s"] * 1e3, 2),
        "peak_gb": peak, "peak_gb_torch": gb(t.get("peak_memory_bytes")) if t else None,
        "allocated_gb_torch": gb(t.get("max_memory_allocated")) if t else None,
        "estimate_gb": estimate, "estimate_error": None if not peak else round(estimate / peak - 1, 3),
        "finite": r["finite"] and (t is None or t["finite"]),
    })
# One epoch: 750 prompts in micro-batches of m; each runs N - 1 = 49 guided UNet calls without
# gradient and one training update (the optimizer's step is in each update: an overcount of a few
# milliseconds per micro-batch for the baseline, whose batch of 128 is 16 micro-batches).
N, PROMPTS = 50, 750
epoch = {}
for method, batch in (("baseline", 128), ("rid", 8)):
    for ckpt in (False, True):
        cands = [m for m in measurements if m["method"] == method and m["checkpointing"] == ckpt and m["micro_batch"] <= batch]
        if not cands:
            continue
        m = max(cands, key=lambda m: m["micro_batch"])
        per = (N - 1) * m["sample_ms_ril"] + m["ms_ril"]
        key = method + (" checkpointing" if ckpt else "")
        epoch[key] = {"micro_batch": m["micro_batch"], "paper_batch": batch, "epoch_min": round(PROMPTS / m["micro_batch"] * per / 6e4, 2)}
        if m["sample_ms_torch"] is not None:
            epoch[key]["epoch_min_torch"] = round(PROMPTS / m["micro_batch"] * ((N - 1) * m["sample_ms_torch"] + m["ms_torch"]) / 6e4, 2)
paper_epoch_min = {"baseline": 10.05, "rid": 10.10}  # Table 4, aesthetic task, 2x A100
goals = {}
ratios = [m["ratio"] for m in measurements if m["ratio"] is not None]
if ratios:
    goals["step_ratio_at_most_0.9"] = {"worst": max(ratios), "best": min(ratios), "reached": max(ratios) <= 0.9}
if "baseline" in epoch and "rid" in epoch:
    r = epoch["rid"]["epoch_min"] / epoch["baseline"]["epoch_min"]
    goals["rid_epoch_over_baseline_at_most_1.03"] = {"value": round(r, 4), "reached": r <= 1 + 1.5 / N}
for method in ("baseline", "rid"):
    if method in epoch:
        e = epoch[method]["epoch_min"]
        goals[f"{method}_epoch_at_most_half_paper"] = {"minutes": e, "paper_2xA100": paper_epoch_min[method], "reached": e <= paper_epoch_min[method] / 2}
errors = [m["estimate_error"] for m in measurements if m["estimate_error"] is not None]
if errors:
    goals["estimate_within_15pct"] = {"worst": max(errors, key=abs), "reached": all(abs(e) <= 0.15 for e in errors)}
smoke = out / "smoke/comparison.json"
result = {"device": env["device"], "driver": env.get("driver"), "cuda": env.get("cuda"), "cuda_driver_api": env.get("cuda_driver_api"),
          "torch": env["torch"], "date": env["date"], "measurements": measurements, "epoch_min": epoch,
          "paper_epoch_min_2xA100": paper_epoch_min, "goals": goals,
          "smoke": json.loads(smoke.read_text()) if smoke.exists() else None, "failures": failures}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
lines = [f"Measured {env['date'][:10]} on {env['device']} (driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env['torch']}).", "",
         "| method | micro-batch | checkpointing | ril-pipe ms | PyTorch ms | ratio | sampling step ms (ril / torch) | peak GB (ril / torch reserved) | estimate GB | estimate error |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for m in measurements:
    err = "-" if m["estimate_error"] is None else f"{m['estimate_error'] * 100:+.0f}%"
    lines.append(f"| {m['method']} | {m['micro_batch']} | {'yes' if m['checkpointing'] else 'no'} | {fmt(m['ms_ril'])} | {fmt(m['ms_torch'])} | {fmt(m['ratio'], 3)} | "
                 f"{fmt(m['sample_ms_ril'])} / {fmt(m['sample_ms_torch'])} | {fmt(m['peak_gb'], 2)} / {fmt(m['peak_gb_torch'], 2)} | {fmt(m['estimate_gb'], 2)} | {err} |")
lines += ["", "| method | micro-batch | minutes per epoch, ril-pipe | PyTorch eager | paper (2x A100) |", "|---|---|---|---|---|"]
for key, e in epoch.items():
    lines.append(f"| {key} | {e['micro_batch']} | {e['epoch_min']:.2f} | {fmt(e.get('epoch_min_torch'), 2)} | {paper_epoch_min[key.split()[0]]:.2f} |")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(json.dumps(goals, indent=1))
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
        sed -n '2,/^set -uo/p' "$0" | sed '$d'
        exit 2
        ;;
esac
