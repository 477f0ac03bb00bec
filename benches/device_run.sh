#!/usr/bin/env bash
# The device run (issue 12): on a machine with an NVIDIA GPU, the release
# binary built elsewhere checks that it runs on the NVIDIA adapter (PCI
# vendor 0x10DE, not lavapipe), then times everything the benchmarks record,
# side by side with the PyTorch peer on the same weights and data, and writes
# one JSON of everything to $OUT/device_run.json (logs beside it).
#
# Prepare here (no GPU needed), from the repository root:
#   cargo build --release
#   cargo build --release --example lanczos_host_cost
#   mkdir -p .devbin && cp target/release/hesscope target/release/examples/lanczos_host_cost .devbin/ && strip .devbin/*
#   # the fixtures the correctness step reads (those with ref-*/reference.json, ~3.5 MB):
#   mkdir -p .devbin/fixtures && for d in ../shared/fixtures/*/; do ls "$d"ref-*/reference.json >/dev/null 2>&1 && cp -r "$d" .devbin/fixtures/; done
#   echo /.devbin/ >> .git/info/exclude
#   # the Vulkan/EGL loaders, once (see ../.library/device/README.md):
#   echo /.gl/ >> .git/info/exclude; mkdir -p .gl /tmp/amd64/partial
#   o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
#   apt-get $o update; (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
# Run there (device tool): carry [".devbin", ".gl"], command
#   bash benches/device_run.sh
# Environment: OUT (where results go; default ./device-out), HESSCOPE (the
# binary; default .devbin/hesscope), QUICK=1 for a short smoke run,
# DRY_RUN=1 to check the script itself on a machine without an NVIDIA GPU
# (any adapter, QUICK sizes, no resnet18 or PyTorch peer; its numbers are
# not GPU numbers), FIXTURES (default .devbin/fixtures, else
# ../shared/fixtures), ONLY=selftest to stop after the correctness step.
#
# The correctness step runs first: `hesscope selftest` on the adapter
# (gradient and Hv of every fixture against PyTorch's float64, with the
# tiled convs and split reductions forced on too, eigs top 5, a density
# against the exact spectrum) into $OUT/selftest.json; device_run.json
# carries it as `selftest` and its verdict as `correct`, so the first
# minutes on a lent GPU say whether its numbers are right before how fast
# they are. Timing goes on after a failure (the failure is the finding).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
HS="${HESSCOPE:-.devbin/hesscope}"
LOG="$OUT/device_run.log"
: > "$LOG"
say() { echo "== $*" | tee -a "$LOG"; }

if [ -d .gl ]; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && [ -z "${VK_DRIVER_FILES:-}" ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
[ -x "$HS" ] || { say "no binary at $HS (see the header of this script)"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$LOG" 2>&1

# 1. The adapter: the NVIDIA one on Vulkan, by PCI vendor id.
"$HS" devices --json > "$OUT/devices.json" 2>> "$LOG" || { say "hesscope devices failed"; exit 3; }
ADAPTER=$(python3 - "$OUT/devices.json" <<'EOF'
import json, sys
ads = json.load(open(sys.argv[1]))["adapters"]
nv = [a for a in ads if a["backend"] == "vulkan" and a.get("vendor") == 0x10DE]
print(nv[0]["index"] if nv else "")
EOF
)
REPS=10
LZ_N=11689512
if [ "${DRY_RUN:-0}" = 1 ]; then
    QUICK=1
    REPS=1
    LZ_N=272474
    ADAPTER=0
    say "DRY_RUN: adapter 0 whatever it is; these are not GPU numbers"
fi
if [ -z "$ADAPTER" ]; then
    say "no NVIDIA (vendor 0x10DE) Vulkan adapter: refusing to time lavapipe as a GPU"
    cat "$OUT/devices.json" >> "$LOG"
    exit 4
fi
[ "${DRY_RUN:-0}" = 1 ] || say "NVIDIA Vulkan adapter index $ADAPTER"
GPU=(--backend vulkan --adapter "$ADAPTER")

# 1b. Correctness before speed (see the header).
timed() { # name, command...: wall seconds of the command into $OUT/<name>.time
    local name=$1; shift
    local t0; t0=$(date +%s.%N)
    "$@" > "$OUT/$name.json" 2>> "$LOG"
    local rc=$?
    python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$(date +%s.%N)" > "$OUT/$name.time"
    say "$name: rc $rc, $(cat "$OUT/$name.time") s"
    return $rc
}
FIX="${FIXTURES:-.devbin/fixtures}"
[ -d "$FIX" ] || FIX=../shared/fixtures
if timed selftest "$HS" selftest "${GPU[@]}" --fixtures "$FIX" --json; then
    say "selftest: every check passed"
else
    say "selftest FAILED (or did not run): see $OUT/selftest.json and the log; timing anyway"
fi
python3 - "$OUT/selftest.json" <<'EOF' | tee -a "$LOG"
import json, sys
try:
    text = open(sys.argv[1]).read().strip()
    r = json.loads(text.splitlines()[-1])
except Exception as e:
    print(f"selftest: no report ({e!r})")
    sys.exit(0)
for c in r["checks"]:
    err = "-" if c["error"] is None else f'{c["error"]:.2e}'
    print(f'{"pass" if c["passed"] else "FAIL"} {c["fixture"]:<20} {c["engine"]:<11} {c["quantity"]:<13} {err:>9} (tol {c["tolerance"]:.0e})')
print(f'selftest on {r["adapter"]}: {r["failed"]} of {len(r["checks"])} failed, {r["seconds"]:.1f} s')
EOF

# 2. Files shared with the PyTorch peer.
if [ "${ONLY:-}" != selftest ]; then
B=128
[ "${QUICK:-0}" = 1 ] && B=32
"$HS" init --model resnet20 --out "$OUT/w20.safetensors" >> "$LOG" 2>&1
"$HS" synth --model resnet20 --samples "$B" --out "$OUT/d20.safetensors" >> "$LOG" 2>&1
COMMON20=(--model resnet20 --weights "$OUT/w20.safetensors" --data "$OUT/d20.safetensors" --batch "$B")

# 3. hesscope: the kernel table and gradient / HVP at resnet20 batch B.
# On a GPU the table holds the tiled conv kernels at the tile the engine
# chooses per layer (marked *) and at every other candidate tile
# (bench::TILE_CANDIDATES): the data for choosing tiles per adapter.
timed bench_resnet20 "$HS" bench "${GPU[@]}" "${COMMON20[@]}" --reps "$REPS" --json
# K-block HVPs (issue 12 item 1) where the binary has them.
# `bench --block-sizes` builds the engine for the largest K and times a
# block product per vector at each (BenchReport.block_products).
if "$HS" bench --help 2>/dev/null | grep -q -- '--block-sizes'; then
    timed bench_resnet20_blocks "$HS" bench "${GPU[@]}" "${COMMON20[@]}" --reps "$REPS" --no-kernels --block-sizes 1,4,16 --json
else
    say "this binary has no --block-sizes: K-block HVPs not measured"
fi
# The engine with its reductions a workgroup per channel (the emulators'
# form) against the default above (split in segments on a GPU): what the
# split buys end to end. The kernel table above times both forms per kernel.
if "$HS" bench --help 2>/dev/null | grep -q -- '--reductions'; then
    timed bench_resnet20_whole_reductions "$HS" bench "${GPU[@]}" "${COMMON20[@]}" --reps "$REPS" --no-kernels --reductions whole --json
fi
# The README's default density.
timed density_default "$HS" density "${GPU[@]}" --json
# Decisions as float64 takes them (the default): the same densities with
# each float32 pass's own decisions, for the cost of taking them from a
# float64 forward pass on the host (the reports' `decisions` say how many
# lay within float32 rounding and how many float32 flipped).
if "$HS" density --help 2>/dev/null | grep -q -- '--decisions'; then
    timed density_default_float32_decisions "$HS" density "${GPU[@]}" --decisions float32 --json
    timed density_resnet20_float32_decisions "$HS" density "${GPU[@]}" "${COMMON20[@]}" --steps 40 --runs 2 --decisions float32 --json
fi
# A density at resnet20's size: its JSON splits lanczos_seconds into the
# products (hvp_seconds) and the host's reorthogonalisation (the rest),
# which says whether the Lanczos basis should move to the device.
timed density_resnet20 "$HS" density "${GPU[@]}" "${COMMON20[@]}" --steps 40 --runs 2 --json
# The same with the basis kept on the host (the default, auto, keeps it on
# a GPU where it fits): the JSON's `basis` says where it was.
timed density_resnet20_host_basis "$HS" density "${GPU[@]}" "${COMMON20[@]}" --steps 40 --runs 2 --basis-on host --json
# Lanczos apart from the products at resnet18's size (11.7M), 40 steps:
# the basis on the host's cores against the GPU's (compensated GEMVs).
if [ -x .devbin/lanczos_host_cost ]; then
    timed lanczos_resnet18_host .devbin/lanczos_host_cost "$LZ_N" 40 1 1 host
    timed lanczos_resnet18_device .devbin/lanczos_host_cost "$LZ_N" 40 1 1 vulkan
fi
# resnet18 at 224×224: the largest batch that fits, from 64 down.
for R18 in 64 32 16 8 4 2; do
    [ "${DRY_RUN:-0}" = 1 ] && break
    [ "${QUICK:-0}" = 1 ] && [ "$R18" -gt 4 ] && continue
    if timed "bench_resnet18_b$R18" "$HS" bench "${GPU[@]}" --model resnet18 --samples "$R18" --batch "$R18" --reps 3 --no-kernels --json; then
        echo "$R18" > "$OUT/resnet18_batch"
        break
    fi
done

# 3b. torchvision's own CNNs exported (python/hesscope_export) and checked
# against PyTorch float64 on the NVIDIA adapter with float64 decisions
# (issue 26: within 1e-5), PyTorch float32 beside them; five of the fifteen
# (python/tests/check_models.py runs all where time allows).
if [ "${DRY_RUN:-0}" != 1 ] && python3 -c 'import torch, torchvision, safetensors' 2>/dev/null; then
    timed torchvision_models env PYTHONPATH=python HESSCOPE="$HS" timeout 300 \
        python3 python/tests/check_models.py resnet50 mobilenet_v3_small densenet121 \
        efficientnet_b0 shufflenet_v2_x0_5 vgg11_bn alexnet wide_resnet50_2 --size 64 --batch 4 --backends vulkan \
        --hesscope-args "--adapter $ADAPTER" --work "$OUT/models"
    rm -rf "$OUT/models"
fi

# 3c. The float64 CPU engine (issue 24) on this machine's quiet cores, beside
# PyTorch's CPU HVP (float32 and float64) and PyHessian where installed:
# same-run ratios, on two cores (taskset, as the CI-like machine) and on all.
if [ "${DRY_RUN:-0}" != 1 ] && python3 -c 'import torch' 2>/dev/null; then
    for CORES in 0,1 all; do
        PIN=""; [ "$CORES" = all ] || PIN="taskset -c $CORES"
        tag=$(echo "$CORES" | tr ',' '_')
        $PIN sh benches/cpu_hvp_compare.sh 2 "$HS" > "$OUT/cpu_hvp_$tag.txt" 2>&1 || true
        if python3 -c 'import pyhessian' 2>/dev/null; then
            $PIN sh benches/cpu_density_compare.sh 1 "$HS" > "$OUT/cpu_density_$tag.txt" 2>&1 || true
        else
            $PIN "$HS" density --backend cpu --json > "$OUT/cpu_density_$tag.json" 2>>"$LOG" || true
        fi
    done
fi

# 3d. Transformers (issue 25) exported from torchvision and Hugging Face
# against PyTorch float64: the float64 engine and the NVIDIA adapter
# (attention kernels, shaders/attention.wgsl); then GPT-2 small's shape
# (12 layers, 12 heads of 64, 50257 tokens' vocabulary; batch 4 of 256
# tokens) on the GPU against PyTorch float64 on the host, timed.
if [ "${DRY_RUN:-0}" != 1 ] && python3 -c 'import torch, torchvision, transformers' 2>/dev/null; then
    env PYTHONPATH=python HESSCOPE="$HS" timeout 120 python3 python/tests/check_transformers.py \
        --backends cpu --work "$OUT/tf" > "$OUT/transformers.txt" 2>&1 || true
    env PYTHONPATH=python HESSCOPE="$HS" timeout 120 python3 python/tests/check_transformers.py \
        --backends vulkan --hesscope-args "--adapter $ADAPTER" --work "$OUT/tf" \
        > "$OUT/transformers_gpu.txt" 2>&1 || true
    env PYTHONPATH=python HESSCOPE="$HS" timeout 300 python3 python/tests/check_transformers.py hf-gpt2-tiny \
        --config '{"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 256, "vocab_size": 50257}' \
        --backends vulkan --hesscope-args "--adapter $ADAPTER" --work "$OUT/tf_small" \
        > "$OUT/transformers_gpt2_small.txt" 2>&1 || true
    rm -rf "$OUT/tf" "$OUT/tf_small"
fi

# 3e. Papyan's operators (issue 22): a Gauss–Newton and a residual product
# against the Hessian's at resnet20 (the GPU engine's G·v runs its R-pass
# on zero loss adjoints; E takes one sweep of each).
for OP in ggn residual; do
    timed "hvp_${OP}_resnet20" "$HS" hvp "${GPU[@]}" "${COMMON20[@]}" --operator "$OP" --json
done
timed hvp_hessian_resnet20 "$HS" hvp "${GPU[@]}" "${COMMON20[@]}" --json

# 4. The PyTorch peer on the same files, FP32 with TF32 off.
[ "${DRY_RUN:-0}" = 1 ] || timed peer_resnet20 python3 benches/peer/pytorch_hvp.py "${COMMON20[@]}" --repeats 20 --json

fi # ONLY=selftest

# 5. One JSON of everything.
python3 - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
res = {"devices": json.load(open(os.path.join(out, "devices.json")))}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(f)[:-5]
    if name in ("devices", "device_run"):
        continue
    entry = {}
    try:
        with open(f) as fh:
            text = fh.read().strip()
        entry["result"] = json.loads(text.splitlines()[-1]) if text else None
    except Exception as e:  # a failed run leaves no JSON: say so
        entry["error"] = repr(e)
    t = f[:-5] + ".time"
    if os.path.exists(t):
        entry["wall_seconds"] = float(open(t).read())
    res[name] = entry
rb = os.path.join(out, "resnet18_batch")
res["resnet18_largest_batch"] = int(open(rb).read()) if os.path.exists(rb) else None
st = res.get("selftest", {}).get("result")
res["correct"] = bool(st and st.get("passed"))
json.dump(res, open(os.path.join(out, "device_run.json"), "w"), indent=1)
print(json.dumps({k: v.get("wall_seconds") for k, v in res.items() if isinstance(v, dict) and "wall_seconds" in v}, indent=1))
EOF
say "done: $OUT/device_run.json"
