//! The architecture language's explicit-edge form (`NAME = OP(INPUTS)
//! ARGS`): every built-in model written out by `arch::to_text` reads back
//! to the same model; a graph in which values feed several layers and an
//! add takes three has the gradient its central differences give (float64,
//! 1e-7: h = 1e-5 leaves an O(h²) truncation of ~1e-10 and a rounding of
//! ~1e-11/1e-5 relative) and the GPU's within the 1e-5 of every fixture;
//! bad graphs are refused naming the line.

mod common;

use hesscope::cpu::CpuReference;
use hesscope::data;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::GpuEngine;
use hesscope::model::{arch, Model, Weights, BUILTIN};

fn same_model(a: &Model, b: &Model, label: &str) {
    assert_eq!(a.input, b.input, "{label}: input");
    assert_eq!(a.classes, b.classes, "{label}: classes");
    assert_eq!(a.n_params, b.n_params, "{label}: parameter count");
    assert_eq!(a.params.len(), b.params.len(), "{label}: tensors");
    for (p, q) in a.params.iter().zip(&b.params) {
        assert_eq!(
            (&p.name, &p.shape, p.offset, p.init),
            (&q.name, &q.shape, q.offset, q.init),
            "{label}: parameter"
        );
    }
    assert_eq!(a.buffers.len(), b.buffers.len(), "{label}: buffers");
    for (p, q) in a.buffers.iter().zip(&b.buffers) {
        assert_eq!(
            (&p.name, p.len, p.init),
            (&q.name, q.len, q.init),
            "{label}: buffer"
        );
    }
    assert_eq!(a.nodes.len(), b.nodes.len(), "{label}: nodes");
    for (i, (m, n)) in a.nodes.iter().zip(&b.nodes).enumerate() {
        assert_eq!(m.op, n.op, "{label}: node {i} op");
        assert_eq!(m.inputs, n.inputs, "{label}: node {i} inputs");
        assert_eq!(
            (m.in_shape, m.out_shape),
            (n.in_shape, n.out_shape),
            "{label}: node {i} shapes"
        );
        let unique = !m.name.is_empty() && a.nodes.iter().filter(|x| x.name == m.name).count() == 1;
        if unique {
            assert_eq!(m.name, n.name, "{label}: node {i} name");
        }
    }
}

#[test]
fn every_builtin_model_round_trips_through_the_explicit_form() {
    let fixture = common::fixtures_dir().join("tv-resnet18-trunc/tv-resnet18-trunc.arch");
    let mut names: Vec<String> = BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
    names.push(fixture.to_str().unwrap().to_string());
    for name in names {
        let m = Model::load(&name).unwrap();
        let text = arch::to_text(&m);
        assert!(text.contains(" = "), "{name}: {text}");
        let back = arch::parse(&format!("{name} (explicit)"), &text)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
        same_model(&m, &back, &name);
        // And once more: the written form is a fixed point.
        assert_eq!(arch::to_text(&back), text, "{name}");
    }
}

/// A value feeding three layers, an add of three values, a sequential
/// line continuing from an explicit one, smooth activations (so central
/// differences are exact to their order).
const DAG: &str = "model dag
input 2 6 6
classes 3
conv stem 4 k=3 pad=1      # a sequential line: value `stem`
a = tanh(stem)
b = conv(a) 4 k=3 pad=1
c = conv(a) 4 k=1
d = silu(stem)
s = add(a, b, c)
t = add(s, d)
gelu                        # continues from t
avgpool k=2
flatten
linear fc 3
";

fn dag_problem(bn: BnMode) -> Problem {
    let model = arch::parse("dag.arch", DAG).unwrap();
    let weights = Weights::init(&model, 3);
    let data = data::try_synthetic(model.input, model.classes, 6, 3).unwrap();
    Problem::new(model, weights, data, 6, bn).unwrap()
}

#[test]
fn a_graph_with_shared_values_has_its_finite_difference_gradient() {
    let p = dag_problem(BnMode::Batch);
    let adds = p
        .model
        .nodes
        .iter()
        .filter(|n| n.op == hesscope::model::Op::Add)
        .count();
    assert_eq!(adds, 3, "add(a, b, c) is two adds, add(s, d) one");
    let mut cpu = CpuReference::new(p.clone());
    let (_, g) = cpu.loss_grad().unwrap();
    let h = 1e-5;
    let mut fd = vec![0.0; g.len()];
    for (i, f) in fd.iter_mut().enumerate() {
        let at = |d: f64| {
            let mut q = p.clone();
            q.weights.theta[i] += d;
            CpuReference::new(q).loss_grad().unwrap().0
        };
        *f = (at(h) - at(-h)) / (2.0 * h);
    }
    let err = common::rel_err(&g, &fd);
    assert!(err <= 1e-7, "gradient vs central differences: {err:.1e}");
}

#[test]
fn a_graph_with_shared_values_matches_on_the_gpu() {
    let p = dag_problem(BnMode::Batch);
    let v: Vec<f64> = (0..p.model.n_params)
        .map(|i| ((i * 37 % 11) as f64 - 5.0) / 7.0)
        .collect();
    let mut cpu = CpuReference::new(p.clone());
    let (_, g, hv) = cpu.loss_grad_hvp(&v).unwrap();
    for (name, ctx) in common::gpu_contexts() {
        let mut e = GpuEngine::new(ctx, &p).unwrap();
        let (_, g2, hv2) = e.loss_grad_hvp(&v).unwrap();
        let (eg, eh) = (common::rel_err(&g2, &g), common::rel_err(&hv2, &hv));
        assert!(
            eg <= 1e-5 && eh <= 1e-5,
            "{name}: gradient {eg:.1e}, Hv {eh:.1e}"
        );
    }
}

#[test]
fn bad_graphs_are_refused_naming_the_line() {
    let head = "model m\ninput 1 4 4\nclasses 2\n";
    let cases = [
        ("a = relu(nosuch)\n", "line 4", "no value named `nosuch`"),
        (
            "a = conv(input) 2 k=3\nb = conv(input) 3 k=1\nc = add(a, b)\n",
            "line 6",
            "different shapes",
        ),
        (
            "a = relu(input)\na = tanh(input)\n",
            "line 5",
            "defined twice",
        ),
        ("a = model(input)\n", "line 4", "not a layer"),
        ("a = relu(input, input)\n", "line 4", "takes one input"),
        ("a = add(input)\n", "line 4", "at least two inputs"),
        ("a = relu(input\n", "line 4", "missing `)`"),
        (
            "residual r\na = relu(input)\nend\n",
            "line 5",
            "inside `residual`",
        ),
        (
            "a = conv(input) 2 k=9\n",
            "line 4",
            "larger than the padded input",
        ),
    ];
    for (body, line, want) in cases {
        let e = arch::parse("bad.arch", &format!("{head}{body}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(line) && e.contains(want), "{body:?}: {e}");
    }
}
