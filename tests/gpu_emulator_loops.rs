//! llvmpipe (behind lavapipe and Mesa's GL) silently ends a shader's loops
//! once one invocation has run 65535 iterations in all (gallivm's loop
//! limiter). A linear layer of 11000 input features gave loss 2.368 on
//! lavapipe and 2.542 on llvmpipe where float64 gives 2.560, with exit 0;
//! vgg11_bn's classifier.0 (25088 features) was wrong the same way. Engines
//! on a CPU emulator now split a conv or linear reduction that would loop
//! that far across dispatches (tests/gpu_emulator_split.rs), and refuse a
//! batch whose per-channel sums would, naming the layer
//! (`check_emulator_loops`). These tests hold the measured line (just
//! inside it the unsplit kernels match the float64 engine) and the refusal
//! of what cannot be split.

mod common;

use common::gpu::{check_whole_model, image_data, problem_of, tangents};
use common::gpu_contexts;
use hesscope::gpu::GpuEngine;
use hesscope::model::{arch, Weights};
use rand::SeedableRng;

/// Within 1e-5 of float64, as every whole-network GPU check (float32
/// kernels over sums of ~10⁴ terms); a loop cut short errs by ≥ 1e-2.
const TOL: f64 = 1e-5;

fn model(text: &str) -> hesscope::model::Model {
    arch::parse("loops.arch", text).unwrap()
}

fn problem(text: &str, n: usize) -> hesscope::engine::Problem {
    let m = model(text);
    let mut r = rand::rngs::StdRng::seed_from_u64(5);
    let data = image_data(&mut r, &m, n, m.classes as u32);
    let theta = Weights::init(&m, 5).theta;
    problem_of(&m, theta, data, n)
}

/// A batch of `n` 64×64 images through a 1×1 convolution and batch norm:
/// n·4096 values per channel in its sums.
const BIG_BATCH: &str =
    "model big-batch\ninput 1 64 64\nclasses 2\nconv c1 2 k=1\nbn b1\nrelu\ngap\nflatten\nlinear fc 2\n";

/// The widest layers the emulators take: a linear of 10800 features (the
/// largest measured right before the guard; 10800·6 ≤ 65535) and a 3×3
/// convolution at stride 2 over 1200 channels (1200·9·6 ≤ 65535), with
/// their backward passes over as many outputs.
#[test]
fn the_widest_accepted_layers_match_float64() {
    let cases = [
        "model wide-linear\ninput 10800 1 1\nclasses 10\nflatten\nlinear fc 10\n",
        "model wide-conv\ninput 1200 3 3\nclasses 10\nconv c1 4 k=3 stride=2\nflatten\nlinear fc 10\n",
        "model wide-out\ninput 4 1 1\nclasses 10\nflatten\nlinear fc1 10800\nrelu\nlinear fc2 10\n",
    ];
    for text in cases {
        let p = problem(text, 3);
        let mut r = rand::rngs::StdRng::seed_from_u64(6);
        let vs = tangents(&mut r, 2, p.model.n_params);
        check_whole_model(&p.model.name, &p, &vs, TOL, true);
    }
    // The largest batch whose per-channel sums stay inside: 600·4096 values
    // a channel, 9600 per thread of a 256-thread workgroup.
    let p = problem(BIG_BATCH, 600);
    let mut r = rand::rngs::StdRng::seed_from_u64(7);
    let vs = tangents(&mut r, 1, p.model.n_params);
    check_whole_model("big-batch 600", &p, &vs, TOL, true);
}

/// What still cannot be split: a batch whose per-channel sums (batch norm,
/// bias and weight-gradient reductions, a 256-thread workgroup a channel)
/// would loop past the limit (700 images of 64×64, one step past the 600
/// accepted above) is refused on every CPU emulator, naming the layer and
/// the cause, by the engine and by the trainer. Conv/linear reductions past
/// the line are no longer refused: they run split across dispatches
/// (tests/gpu_emulator_split.rs).
#[test]
fn unsplittable_loops_are_refused_on_emulators_by_name() {
    let mut checked = 0;
    for (name, ctx) in gpu_contexts() {
        if !ctx.is_cpu_adapter() {
            continue;
        }
        let (p, layer) = (problem(BIG_BATCH, 700), "c1");
        let Err(e) = GpuEngine::new(ctx.share(), &p) else {
            panic!("{name}: `{layer}` accepted");
        };
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("layer `{layer}`")) && msg.contains("65535"),
            "{name}: {msg}"
        );
        let t = hesscope::gpu::trainer::GpuTrainer::new(
            ctx.share(),
            &p.model,
            &p.weights,
            None,
            p.batch,
        );
        let Err(e) = t else {
            panic!("{name}: the trainer accepted `{layer}`");
        };
        assert!(
            e.to_string().contains(&format!("layer `{layer}`")),
            "{name}: {e}"
        );
        checked += 1;
    }
    if common::under_ci() {
        assert!(checked >= 2, "no CPU emulator checked");
    }
}
