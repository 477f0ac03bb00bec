#!/bin/sh
# One HVP of resnet20 at batch 32 on the float64 reference for each of the
# given hesscope binaries in turn, beside PyTorch's double-backward HVP of
# the same model on the same CPU (benches/peer/pytorch_hvp.py, float32 and
# float64), ROUNDS times over: same-run ratios on a shared machine. Prints
# one line per run (binary, seconds, vᵀHv).
#   benches/cpu_hvp_compare.sh ROUNDS HESSCOPE_BIN...
set -e
rounds=$1
shift
here=$(dirname "$0")
hvp() {
    "$1" hvp --backend cpu --model resnet20 --samples 32 --batch 32 --json 2>/dev/null |
        python3 -c "import json,sys; d=json.load(sys.stdin); print('$1', d['seconds'], repr(d['vhv']))"
}
torch_hvp() {
    python3 -W ignore "$here/peer/pytorch_hvp.py" --model resnet20 --batch 32 --device cpu \
        --dtype "$1" --repeats 3 --json |
        python3 -c "import json,sys; d=json.load(sys.stdin); print('torch-$1', d['hvp_double_backward_s'], 'grad', d['grad_s'], 'jvp', d['hvp_jvp_of_grad_s'])"
}
i=0
while [ "$i" -lt "$rounds" ]; do
    for bin in "$@"; do
        hvp "$bin"
    done
    torch_hvp float32
    torch_hvp float64
    i=$((i + 1))
done
