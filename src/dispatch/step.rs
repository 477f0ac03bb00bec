//! A step: one kernel dispatch with its parameters, override constants,
//! buffers (arena indices) and grid, as plans record it; `gpu::program`
//! materialises lists of them on a device.

use crate::dispatch::kernels::{Consts, Kernel, KernelParams, Params, WORKGROUP};

/// How many workgroups a step launches.
#[derive(Clone, Copy, Debug)]
pub enum Grid {
    /// One thread per element.
    Threads(usize),
    /// One workgroup per item (reductions).
    Groups(usize),
}

impl Grid {
    pub fn groups(self) -> usize {
        match self {
            Grid::Threads(n) => n.div_ceil(WORKGROUP),
            Grid::Groups(n) => n,
        }
    }
}

pub struct Step {
    pub kernel: Kernel,
    /// The override constants the kernel is specialised with.
    pub consts: Consts,
    pub params: Params,
    /// Indices into the engine's buffer arena, one per storage binding.
    pub buffers: Vec<usize>,
    pub grid: Grid,
    /// Offset (floats) of the step's uniform weight windows, if it has any.
    pub window: usize,
}

impl Step {
    /// A step of `kernel` with typed parameters; the params struct must be
    /// the one the kernel's WGSL declares (checked against the spec table,
    /// which tests/shaders.rs checks against the WGSL).
    pub fn new<P: KernelParams>(
        kernel: Kernel,
        consts: Consts,
        p: &P,
        buffers: Vec<usize>,
        grid: Grid,
    ) -> Step {
        check_params::<P>(kernel, &consts);
        Step {
            kernel,
            consts,
            params: p.block(),
            buffers,
            grid,
            window: 0,
        }
    }
}

/// Internal invariants of a step: the kernel's params struct and the
/// override constants it declares.
pub fn check_params<P: KernelParams>(kernel: Kernel, consts: &Consts) {
    let spec = kernel.spec();
    assert_eq!(
        spec.params,
        P::WGSL_NAME,
        "internal: {kernel:?} takes {}",
        spec.params
    );
    for name in consts.names() {
        assert!(
            spec.overrides.contains(&name),
            "internal: {kernel:?} has no override constant {name}"
        );
    }
}
