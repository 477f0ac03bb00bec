"""prepare.py split SYNTH OUTDIR N_TRAIN NOISE SEED | prepare.py start BN.safetensors NOBN.safetensors OUT
split: one synthetic draw (`hesscope synth`: class template + 0.5·N(0,1) per pixel) made
harder by adding NOISE·N(0,1) per pixel (Python's random.Random(SEED), so reproducible),
then split into train (first N_TRAIN samples) and test (the rest).
start: given BN and NOBN init files, build the
no-BN net's start from the BN net's: every tensor the two share by name (convs, fc)
copied, the no-BN convs' biases set to 0 (BN's initial shift), so both nets start
from the same conv/fc weights."""
import random, struct, sys
import st

def split(src, outdir, ntrain, noise, seed):
    t = st.load(src)
    xd, xs, xr = t["x"]
    assert xd == "F64", xd
    rng = random.Random(seed)
    vals = struct.unpack(f"<{len(xr) // 8}d", xr)
    xr = struct.pack(f"<{len(vals)}d", *(v + noise * rng.gauss(0.0, 1.0) for v in vals))
    yd, ys, yr = t["y"]
    n = xs[0]
    per = st.numel(xs[1:]) * st.ITEM[xd]
    yi = st.ITEM[yd]
    st.save(f"{outdir}/train.safetensors", {"x": (xd, [ntrain] + xs[1:], xr[: ntrain * per]),
                                             "y": (yd, [ntrain], yr[: ntrain * yi])})
    st.save(f"{outdir}/test.safetensors", {"x": (xd, [n - ntrain] + xs[1:], xr[ntrain * per:]),
                                            "y": (yd, [n - ntrain], yr[ntrain * yi:])})
    print(f"train {ntrain}, test {n - ntrain} samples")

def shared_start(bn_path, nobn_path, out):
    a, b = st.load(bn_path), st.load(nobn_path)
    res, copied, zeroed = {}, [], []
    for k, (d, s, r) in b.items():
        if k in a and a[k][1] == s:
            res[k] = a[k]
            copied.append(k)
        elif k.endswith(".bias") and not k.startswith("fc"):
            res[k] = (d, s, b"\x00" * len(r))
            zeroed.append(k)
        else:
            raise SystemExit(f"no counterpart for {k}")
    st.save(out, res)
    print("copied from the BN net:", ", ".join(sorted(copied)))
    print("zero biases:", ", ".join(sorted(zeroed)))

if __name__ == "__main__":
    if sys.argv[1] == "split":
        split(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]))
    else:
        shared_start(sys.argv[2], sys.argv[3], sys.argv[4])
