//! Module paths as PyTorch writes them: RegNet's `trunk_output.block1.block1-0`
//! has a `-` in a part, so its state_dict names do; the architecture
//! parser takes them in both line forms, and still refuses what no module
//! path holds, naming it.

use hesscope::model::arch;

#[test]
fn module_paths_may_hold_hyphens() {
    let text = "model t\ninput 3 4 4\nclasses 2\n\
                trunk.block1-0.a = conv(input) 4 k=1 stride=1 pad=0 bias=false\n\
                trunk.block1-0.bn = bn(trunk.block1-0.a)\n\
                trunk.block1-0 = relu(trunk.block1-0.bn)\n\
                conv block2-0.b 4 k=1\n\
                gap\nlinear fc 2\n";
    let m = arch::parse("t.arch", text).unwrap();
    let names: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "trunk.block1-0.a.weight",
            "trunk.block1-0.bn.weight",
            "trunk.block1-0.bn.bias",
            "block2-0.b.weight",
            "block2-0.b.bias",
            "fc.weight",
            "fc.bias"
        ]
    );
    let again = arch::parse("again.arch", &arch::to_text(&m)).unwrap();
    assert_eq!(again.params.len(), m.params.len());
    for bad in ["a..b", "a b", "a/b", ".a"] {
        let t = format!("model t\ninput 3 4 4\nclasses 2\nconv {bad} 4 k=1\ngap\nlinear fc 2\n");
        let e = arch::parse("t.arch", &t).unwrap_err().to_string();
        assert!(e.contains("line 4"), "{bad}: {e}");
    }
}
