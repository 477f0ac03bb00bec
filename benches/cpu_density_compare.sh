#!/bin/sh
# The README's default density job (cnn-tiny, 256 samples, batch 128, 90
# steps x 10 runs = 900 HVPs) on the float64 engine (--backend cpu) for each
# of the given hesscope binaries in turn, beside PyHessian on the same files
# and the same CPU (benches/peer/pyhessian_density.py; pip install pyhessian),
# ROUNDS times over: same-run ratios on a shared machine. Prints one line per
# run: who, wall seconds, process CPU seconds (user + system, all threads:
# what a loaded machine's wall time hides), lambda_max, lambda_min.
#   benches/cpu_density_compare.sh ROUNDS HESSCOPE_BIN...
set -e
rounds=$1
shift
here=$(dirname "$0")
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$1" init --out "$dir/w.safetensors" >/dev/null
"$1" synth --out "$dir/d.safetensors" >/dev/null
density() {
    /usr/bin/time -f "%U %S" -o "$dir/time" "$1" density --backend cpu \
        --weights "$dir/w.safetensors" --data "$dir/d.safetensors" --out "$dir/d.json" \
        >/dev/null 2>&1
    python3 -c "
import json
d = json.load(open('$dir/d.json'))
u, s = open('$dir/time').read().split()[-2:]
print('$1', 'wall', d['seconds'], 'cpu', round(float(u) + float(s), 2), d['lambda_max'], d['lambda_min'])"
}
pyhessian() {
    python3 -W ignore "$here/peer/pyhessian_density.py" --weights "$dir/w.safetensors" \
        --data "$dir/d.safetensors" --hvp-repeats 3 2>/dev/null |
        python3 -c "import json,sys; d=json.load(sys.stdin); print('pyhessian', 'wall', d['seconds'], 'cpu', d.get('cpu_seconds'), d.get('lambda_max'), d.get('lambda_min'))"
}
i=0
while [ "$i" -lt "$rounds" ]; do
    for bin in "$@"; do
        density "$bin"
    done
    pyhessian
    i=$((i + 1))
done
