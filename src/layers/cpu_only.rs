//! The GPU side of units that have float64 passes only (the sequence
//! layers of issue 25): `check` refuses the node naming the layer, so the
//! GPU executor (which checks every node before planning) never plans them.

/// `check` refusing the GPU, and the three plan methods, which are never
/// reached after that refusal and push nothing. (Every unit has GPU
/// kernels at present; kept for the next float64-first unit.)
#[allow(unused_macros)]
macro_rules! cpu_only_gpu {
    () => {
        fn check(&self, node: &crate::model::Node) -> crate::error::Result<()> {
            Err(crate::layers::unsupported(
                node,
                format!(
                    "{} has no GPU kernels yet (the float64 reference computes it: \
                     --backend cpu)",
                    node.kind()
                ),
            ))
        }
        fn plan_forward(
            &self,
            _p: &mut crate::dispatch::plan::Plan,
            _node: &crate::model::Node,
            _io: &crate::dispatch::plan::NodeBufs,
        ) {
        }
        fn plan_r_forward(
            &self,
            _p: &mut crate::dispatch::plan::Plan,
            _node: &crate::model::Node,
            _io: &crate::dispatch::plan::NodeBufs,
        ) -> bool {
            true
        }
        fn plan_backward(
            &self,
            _p: &mut crate::dispatch::plan::Plan,
            _node: &crate::model::Node,
            _io: &crate::dispatch::plan::NodeBufs,
            _r: bool,
        ) {
        }
    };
}
