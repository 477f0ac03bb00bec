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
    ] {
        let m = Model::load(name).unwrap();
        assert_eq!(m.n_params, count, "{name}");
    }
}

#[test]
fn fixture_parameter_order_and_shapes_match() {
    for (name, _) in common::fixture_cases() {
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
