//! Conv/linear reductions split across dispatches on CPU emulators.
//!
//! llvmpipe (behind lavapipe and Mesa's GL) silently ends a shader
//! invocation's loops after 65535 iterations in all
//! (`kernels::EMULATOR_LOOP_LIMIT`). A conv/linear forward (and
//! R-forward) thread loops over its input channels × taps, a backward-data
//! (and R-backward) thread over the output channels × the taps of one
//! phase; where that would pass the limit (at `ITERATIONS_PER_TAP` per
//! channel·tap, the guard's margin) and the plan splits loops
//! (`Plan::split_loops`, set on CPU adapters running the emulator
//! kernels), the step runs as one dispatch per chunk of those channels
//! (the kernels' `RED0`/`RED1` constants): the first writes (or adds, where
//! the step itself adds) and adds the bias, each later one adds into the
//! output (`ACC`). On GPUs, and wherever one chunk covers the channels,
//! the step is the unsplit one (same kernel, same constants, same bits).
//!
//! Dispatches recorded in one pass run in order (wgpu inserts the barriers
//! between dispatches writing and reading one storage buffer), so each
//! chunk adds to the previous chunk's finished sums: no race. Each output
//! then sums its chunks one after the other, which agrees with the unsplit
//! sum to float32 rounding, not bit for bit.

use crate::dispatch::kernels::{
    self, Consts, ConvParams, Kernel, EMULATOR_LOOP_LIMIT, ITERATIONS_PER_TAP,
};

/// (channels reduced, loop taps per channel) of a forward or backward-data
/// step: forward over the group's input channels × k², backward data over
/// the group's output channels × the taps of one phase (⌈k/s⌉², as the
/// register-blocked kernel visits them), or all k² for conv_direct.wgsl,
/// which visits every tap.
pub fn reduction(kernel: Kernel, pr: &ConvParams, dilation: usize, wt: bool) -> (usize, usize) {
    let g = (pr.groups as usize).max(1);
    let (k, s) = (pr.k as usize, (pr.stride as usize).max(1));
    let direct = wt || kernels::conv_direct_applies(g, dilation);
    match kernel {
        Kernel::ConvForward => (pr.cin as usize / g, k * k),
        _ => {
            let phase = if direct { k } else { k.div_ceil(s) };
            (pr.cout as usize / g, phase * phase)
        }
    }
}

/// The most channels one dispatch may reduce at `taps` loop taps each.
pub fn max_channels(taps: usize) -> usize {
    (EMULATOR_LOOP_LIMIT / (ITERATIONS_PER_TAP * taps.max(1))).max(1)
}

/// The chunks [lo, hi) of `channels` channels at `taps` taps each, as even
/// as possible, each within `max_channels`; one chunk where all fit.
pub fn spans(channels: usize, taps: usize) -> Vec<(usize, usize)> {
    let most = max_channels(taps);
    let parts = channels.div_ceil(most).max(1);
    let per = channels.div_ceil(parts);
    (0..parts)
        .map(|i| (i * per, ((i + 1) * per).min(channels)))
        .filter(|(lo, hi)| lo < hi)
        .collect()
}

/// The constants of chunk `i` [lo, hi) of a split step whose unsplit
/// constants are `c`: later chunks add into the output and add no bias.
pub fn chunk_consts(c: Consts, i: usize, lo: usize, hi: usize) -> Consts {
    let c = c.set("RED0", lo as u32).set("RED1", hi as u32);
    if i == 0 {
        c
    } else {
        c.set("ACC", 1).set("BIAS", 0)
    }
}
