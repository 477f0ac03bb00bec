// Training's updates, run after a mini-batch's forward/backward program so
// that only the loss returns to the host (src/gpu/trainer.rs).
//
// sgd: torch.optim.SGD(lr, momentum, weight_decay), dampening 0, no
// Nesterov, in PyTorch's order of operations:
//   g = ∇L + wd·θ;  buf = g on the first step, else momentum·buf + g;
//   θ = θ − lr·buf.
// bn_running: a batch-norm layer's running buffers from the batch's
// statistics rows (bn.wgsl, kernels::bn_rows): mean = (1 − m)·mean + m·μ,
// var = (1 − m)·var + m·σ²·count/(count − 1) (the unbiased variance).
// first_nonfinite: the divergence check of every step. Records in flag
// slot `out_off` the first element of `len` whose exponent bits are all
// ones (±inf or NaN), as 0xffffffff − index by atomicMax over a flag
// cleared to 0 (0: none). The test is on the bits, so no compiler's
// finite-math assumption can fold it away.

struct SgdParams {
    len: u32, first: u32, lr: f32, momentum: f32,
    weight_decay: f32, _p0: u32, _p1: u32, _p2: u32,
}

struct EwParams {
    len: u32, a_off: u32, out_off: u32, _p0: u32,
}

struct BnRunningParams {
    c: u32, mean_off: u32, var_off: u32, rm_off: u32,
    rv_off: u32, momentum: f32, unbias: f32, _p0: u32,
}

const WG: u32 = 256u;

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@group(0) @binding(0) var<uniform> sp: SgdParams;
@group(0) @binding(1) var<storage, read> sgd_grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> sgd_theta: array<f32>;
@group(0) @binding(3) var<storage, read_write> sgd_buf: array<f32>;

@compute @workgroup_size(256)
fn sgd(@builtin(workgroup_id) wid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= sp.len) { return; }
    let t = sgd_theta[i];
    let g = sgd_grad[i] + sp.weight_decay * t;
    var b = g;
    if (sp.first == 0u) {
        b = sp.momentum * sgd_buf[i] + g;
    }
    sgd_buf[i] = b;
    sgd_theta[i] = t - sp.lr * b;
}

@group(0) @binding(0) var<uniform> rp: BnRunningParams;
@group(0) @binding(1) var<storage, read> run_stats: array<f32>;
@group(0) @binding(2) var<storage, read_write> run_buf: array<f32>;

@compute @workgroup_size(256)
fn bn_running(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let ch = flat(wid, nwg, lid);
    if (ch >= rp.c) { return; }
    let m = rp.momentum;
    let rm = rp.rm_off + ch;
    let rv = rp.rv_off + ch;
    run_buf[rm] = (1.0 - m) * run_buf[rm] + m * run_stats[rp.mean_off + ch];
    run_buf[rv] = (1.0 - m) * run_buf[rv] + m * (run_stats[rp.var_off + ch] * rp.unbias);
}

@group(0) @binding(0) var<uniform> fp: EwParams;
@group(0) @binding(1) var<storage, read> fin_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> fin_flags: array<atomic<u32>>;

@compute @workgroup_size(256)
fn first_nonfinite(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= fp.len) { return; }
    let bits = bitcast<u32>(fin_x[i]);
    if ((bits & 0x7f800000u) == 0x7f800000u) {
        atomicMax(&fin_flags[fp.out_off], 0xffffffffu - i);
    }
}
