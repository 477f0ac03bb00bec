#!/usr/bin/env bash
# Rerun the experiment: ./run.sh OUT_DIR   (then: python3 summarize.py OUT_DIR)
# Everything is seeded; on the float64 reference (--backend cpu) a rerun gives the same numbers.
# Env: HESSCOPE (default: ../../target/release/hesscope), JOBS=2 (runs in parallel),
#      SEED=0 (the nets' init and the training order; the data are the same for every SEED).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: run.sh OUT_DIR}
H=${HESSCOPE:-$HERE/../../target/release/hesscope}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
mkdir -p "$OUT/data"
OUT=$(cd "$OUT" && pwd)
S=${SEED:-0}
D=$OUT/data

# 1. Data: one synthetic draw of 768 samples (cnn-tiny's 3x8x8 inputs, 4 classes, seed 0),
#    extra noise 3.0*N(0,1) per pixel so it is not solved in one epoch, first 512 train / 256 test.
$H synth --model cnn-tiny --samples 768 --seed 0 --out "$D/all.safetensors" >/dev/null
python3 "$HERE/prepare.py" split "$D/all.safetensors" "$D" 512 3.0 1

# 2. The same start: cnn-tiny's PyTorch-default init from seed $S; cnn-tiny-nobn gets the same
#    conv and fc tensors (identical names and shapes) and zero conv biases.
$H init --model cnn-tiny --seed $S --out "$D/init-bn.safetensors" >/dev/null
$H init --model cnn-tiny-nobn --seed $S --out "$D/init-nobn-own.safetensors" >/dev/null
python3 "$HERE/prepare.py" start "$D/init-bn.safetensors" "$D/init-nobn-own.safetensors" "$D/init-nobn.safetensors"

RECIPE=(--data "$D/train.safetensors" --test-data "$D/test.safetensors" --epochs 8 --lr 0.05
        --momentum 0.9 --weight-decay 5e-4 --batch 32 --seed $S --backend cpu --dtype f64)
CURV=(--spectrum-every 1 --hessian-samples 256 --hessian-bn batch --hessian-backend cpu
      --top 10 --runs 2 --steps 30 --probes 10 --eigs-steps 200 --tol 1e-4)

# 3. Batch norm on/off, same start, same recipe, curvature every epoch (start included).
#    (--hessian-bn batch: the loss the optimiser sees; nobn has no BN so the mode is moot there.)
$H train --model cnn-tiny      --weights "$D/init-bn.safetensors"   "${RECIPE[@]}" "${CURV[@]}" --out "$OUT/bn"   --json > "$OUT/bn.log" &
$H train --model cnn-tiny-nobn --weights "$D/init-nobn.safetensors" "${RECIPE[@]}" "${CURV[@]}" --out "$OUT/nobn" --json > "$OUT/nobn.log" &
wait

# 4. Hessian-trace regulariser on the middle tensors (Sankar et al.'s floor(n/4) <= i < floor(3n/4)):
#    gamma 1e-4, 1e-3, 1e-2 against gamma 0 (= the BN run of step 3, the same recipe).
for g in 1e-4 1e-3 1e-2; do
  $H train --model cnn-tiny --weights "$D/init-bn.safetensors" "${RECIPE[@]}" \
     --htr-gamma $g --htr-layers middle --htr-probes 1 --htr-every 1 --out "$OUT/htr-$g" --json > "$OUT/htr-$g.log" &
  while [ "$(jobs -r | wc -l)" -ge "${JOBS:-2}" ]; do sleep 1; done
done
wait

# 5. The middle tensors' Hessian trace at every checkpoint of the four cnn-tiny runs, on the same
#    fixed 256-sample subset as the curvature records (BN in batch mode, batches of 32),
#    20 Rademacher probes (seed 0, the same at every epoch). trace-grad prints the estimate.
midtrace() {  # weights run epoch
  $H trace-grad --model cnn-tiny --weights "$1" --data "$D/train.safetensors" --samples 256 --batch 32 \
     --bn batch --layer middle --probes 20 --seed 0 --backend cpu --out "$OUT/$2/tg-tmp-$3.safetensors" --json \
     > "$OUT/$2/midtrace-$3.json"
  rm -f "$OUT/$2/tg-tmp-$3.safetensors"
}
for run in bn htr-1e-4 htr-1e-3 htr-1e-2; do
  for e in 0 1 2 3 4 5 6 7 8; do
    [ $run != bn ] && [ $e = 0 ] && continue   # the shared start: measured once (bn/midtrace-0.json)
    if [ $e = 0 ]; then w=$D/init-bn.safetensors; else w=$OUT/$run/checkpoints/epoch-$e.safetensors; fi
    midtrace "$w" $run $e &
    while [ "$(jobs -r | wc -l)" -ge "${JOBS:-2}" ]; do sleep 1; done
  done
done
wait
echo "done: python3 $HERE/summarize.py $OUT"
