//! Every architecture of the spec, with its exact parameter count and names.

mod common;
use hesscope::model::Model;

#[test]
fn parameter_counts_match_the_spec() {
    for (name, count) in [
        ("mlp-tiny", 932),
        ("cnn-tiny", 1400),
        ("cnn-tiny-nobn", 1364),
        ("resnet20", 272_474),
        ("resnet20-nobn", 271_690),
        ("resnet32", 466_906),
        ("resnet32-nobn", 465_674),
        ("vgg11-bn", 9_231_114),
        ("vgg11", 9_225_610),
        ("resnet18", 11_689_512),
        ("lenet5", 61_706),
        ("cnn-smooth", 2_260),
    ] {
        let m = Model::load(name).unwrap();
        assert_eq!(m.n_params, count, "{name}");
    }
}

#[test]
fn every_builtin_model_is_in_the_count_list_and_loads() {
    for (name, _) in hesscope::model::BUILTIN {
        let m = Model::load(name).unwrap();
        assert_eq!(&m.name, name, "the file's `model` line names it");
    }
    assert_eq!(hesscope::model::BUILTIN.len(), 12);
}

#[test]
fn fixture_parameter_order_and_shapes_match() {
    let cases = common::fixture_cases();
    for name in ["lenet5", "cnn-smooth", "cnn-tiny", "mlp-tiny"] {
        assert!(
            cases.iter().any(|(n, _)| n == name),
            "no fixture for {name} under ../shared/fixtures"
        );
    }
    for (name, _) in cases {
        let meta = common::meta(&name);
        let m = Model::load(&name).unwrap();
        let want: Vec<(String, Vec<usize>)> = meta["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let shape = p[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                (p[0].as_str().unwrap().to_string(), shape)
            })
            .collect();
        let got: Vec<(String, Vec<usize>)> = m
            .params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn cnn_smooth_lowers_to_the_spec_ops_and_shapes() {
    use hesscope::model::{Activation, Op, Shape};
    let m = Model::load("cnn-smooth").unwrap();
    let ops: Vec<(&str, String, Shape)> = m
        .nodes
        .iter()
        .map(|n| (n.kind(), n.name.clone(), n.out_shape))
        .collect();
    let want = [
        ("conv", "conv1", Shape::new(6, 8, 8)),
        ("tanh", "", Shape::new(6, 8, 8)),
        ("avgpool", "", Shape::new(6, 4, 4)),
        ("conv", "conv2", Shape::new(8, 4, 4)),
        ("gelu", "", Shape::new(8, 4, 4)),
        ("conv", "block.conv", Shape::new(8, 4, 4)),
        ("silu", "", Shape::new(8, 4, 4)),
        ("add", "block", Shape::new(8, 4, 4)),
        ("leaky_relu", "", Shape::new(8, 4, 4)),
        ("flatten", "", Shape::new(128, 1, 1)),
        ("linear", "fc1", Shape::new(8, 1, 1)),
        ("sigmoid", "", Shape::new(8, 1, 1)),
        ("linear", "fc2", Shape::new(4, 1, 1)),
    ];
    assert_eq!(ops.len(), want.len(), "{ops:?}");
    for (got, want) in ops.iter().zip(want) {
        assert_eq!((got.0, got.1.as_str(), got.2), want);
    }
    // The residual adds the block's input (value 5, gelu's output) to silu's.
    let add = &m.nodes[7];
    assert_eq!(add.inputs, vec![7, 5]);
    assert!(m.nodes.iter().any(|n| n.op
        == Op::AvgPool {
            k: 2,
            stride: 2,
            pad: 0,
            ceil: false
        }));
    assert!(m
        .nodes
        .iter()
        .any(|n| n.op == Op::Act(Activation::LeakyRelu { slope: 0.1 })));
    let lenet = Model::load("lenet5").unwrap();
    let flat = lenet.nodes.iter().find(|n| n.kind() == "flatten").unwrap();
    assert_eq!(flat.in_shape, Shape::new(16, 5, 5));
}
