//! The uniform parameter block of each shader family, as one `#[repr(C)]`
//! Pod struct per WGSL struct: same name, same members in the same order.
//! Which terms a dispatch computes (a second operand pair, a bias,
//! accumulation, batch statistics) is not a parameter but an override
//! constant of its pipeline (`kernels::Consts`).
//! The engine, `bench` and the kernel tests fill these by name;
//! tests/shaders.rs reflects every WGSL module with naga and checks each
//! struct's member names and offsets against `KernelParams::members`, so a
//! mismatch fails `cargo test`.

use bytemuck::{Pod, Zeroable};

/// A kernel's uniform block: 16 words (u32 or f32 bits), 64 bytes.
pub type Params = [u32; 16];

/// A params struct shared with WGSL.
pub trait KernelParams: Pod {
    /// The WGSL struct's name.
    const WGSL_NAME: &'static str;
    /// (member name, byte offset), in declaration order.
    fn members() -> Vec<(&'static str, usize)>;
    /// The 64-byte uniform block holding these parameters.
    fn block(&self) -> Params {
        const {
            assert!(std::mem::size_of::<Self>() <= 64);
        }
        let mut p = [0u32; 16];
        let bytes = bytemuck::bytes_of(self);
        bytemuck::cast_slice_mut::<u32, u8>(&mut p)[..bytes.len()].copy_from_slice(bytes);
        p
    }
}

macro_rules! params_struct {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty),*
        }
        impl KernelParams for $name {
            const WGSL_NAME: &'static str = stringify!($name);
            fn members() -> Vec<(&'static str, usize)> {
                vec![$((stringify!($field), std::mem::offset_of!($name, $field))),*]
            }
        }
    };
}

params_struct! {
    /// shaders/conv.wgsl and shaders/conv_weight.wgsl: one conv (a linear
    /// layer is a 1×1 conv of a 1×1 image). `wa_off`/`wb_off` locate the
    /// weights of the first and second operand pair in their buffers.
    ConvParams {
        n: u32, cin: u32, h: u32, w: u32,
        cout: u32, k: u32, stride: u32, pad: u32,
        oh: u32, ow: u32, wa_off: u32, wb_off: u32,
        bias_off: u32,
        /// Weight gradient: output rows per chunk of stage one.
        rows_per_chunk: u32,
        /// Weight gradient: chunks of stage one.
        chunks: u32,
        /// Channel groups (weights [cout, cin/groups, k, k]): read by
        /// conv_direct.wgsl and conv_weight_sum; the other conv kernels
        /// compute dense layers only (the conv unit routes the rest).
        groups: u32,
    }
}

params_struct! {
    /// shaders/bn.wgsl.
    BnParams {
        n: u32, c: u32, hw: u32, gamma_off: u32,
        beta_off: u32,
        eps: f32,
        /// bn_stats split in segments (`STAGE` 1, 2; src/dispatch/reduce.rs).
        seg: u32, span: u32,
    }
}

params_struct! {
    /// shaders/reduce.wgsl: channel sums, batch-norm parameter sums, the
    /// loss sum.
    ReduceParams {
        n: u32, c: u32, hw: u32, out_a: u32,
        out_b: u32,
        len: u32, out_d: u32,
        /// bn_param_sums: where Σa and Σa·b (+ Σc·d) go in `tgt`.
        t_a: u32, t_b: u32,
        /// A reduction split in segments (`STAGE` 1, 2; src/dispatch/reduce.rs).
        seg: u32, span: u32, _p0: u32,
    }
}

params_struct! {
    /// shaders/elementwise.wgsl.
    EwParams {
        len: u32, a_off: u32, out_off: u32, _p0: u32,
    }
}

params_struct! {
    /// shaders/pool.wgsl: max, average and global average pools over
    /// planes of [n·c, h, w].
    PoolParams {
        planes: u32, h: u32, w: u32, k: u32,
        stride: u32, pad: u32, oh: u32, ow: u32,
        _p0: u32, _p1: u32, _p2: u32, _p3: u32,
    }
}

params_struct! {
    /// shaders/channels.wgsl: `blocks` blocks copied `len` floats at a
    /// time between strides and offsets (concat, narrow), `blocks` samples
    /// of `c` channels of `hw` shuffled in `groups` (channel shuffle),
    /// `len` products with one factor per `hw` (mul) or `blocks` planes of
    /// `hw` summed (plane_dot).
    ChannelParams {
        blocks: u32, len: u32, src_stride: u32, src_off: u32,
        dst_stride: u32, dst_off: u32, c: u32, hw: u32,
        groups: u32, _p0: u32, _p1: u32, _p2: u32,
    }
}

params_struct! {
    /// shaders/loss.wgsl: softmax cross-entropy, `scale` = 1/N.
    LossParams {
        n: u32, k: u32, scale: f32, _p0: u32,
    }
}

params_struct! {
    /// shaders/layernorm.wgsl: `rows` rows of `d` features; γ and β at
    /// `gamma_off` and `beta_off` of θ (and of v, the gradient, Hv).
    LnParams {
        rows: u32, d: u32, gamma_off: u32, beta_off: u32,
        eps: f32, _p0: u32, _p1: u32, _p2: u32,
    }
}

params_struct! {
    /// shaders/attention.wgsl: `n` samples of `t` tokens, width `d` in
    /// `heads` heads of `e`, `causal` 0 or 1, `pt` = n·heads·t·t (the
    /// second half of the state buffers), `scale` = 1/√e.
    AttnParams {
        n: u32, t: u32, d: u32, heads: u32,
        e: u32, causal: u32, pt: u32, scale: f32,
    }
}

params_struct! {
    /// shaders/embedding.wgsl: `tokens` ids, a weight [vocab, d] of
    /// which rows `r0..r0 + rows` lie at `w_off` (all of them, r0 = 0,
    /// unless the weight is split by rows between bindings).
    EmbParams {
        tokens: u32, d: u32, vocab: u32, w_off: u32,
        r0: u32, rows: u32, _p0: u32, _p1: u32,
    }
}

params_struct! {
    /// shaders/activation.wgsl: `slope` of LeakyReLU.
    ActParams {
        len: u32, slope: f32, _p0: u32, _p1: u32,
    }
}

params_struct! {
    /// shaders/optim.wgsl `sgd`: `first` (0 or 1) makes the momentum
    /// buffer the step's gradient (torch's first step, or momentum 0).
    SgdParams {
        len: u32, first: u32, lr: f32, momentum: f32,
        weight_decay: f32, _p0: u32, _p1: u32, _p2: u32,
    }
}

params_struct! {
    /// shaders/optim.wgsl `bn_running`: the statistics rows at `mean_off`
    /// and `var_off` of the stats buffer, the running buffers at `rm_off`
    /// and `rv_off`; `unbias` = count/(count − 1).
    BnRunningParams {
        c: u32, mean_off: u32, var_off: u32, rm_off: u32,
        rv_off: u32, momentum: f32, unbias: f32, _p0: u32,
    }
}

params_struct! {
    /// shaders/basis.wgsl: a chunk of `rows` rows of a device-resident
    /// basis, vector j at j·`stride`; `vectors` in use; basis_dots splits
    /// the rows into `segments` of `seg_rows`. `zero` is always 0: the
    /// kernels XOR their compensation's intermediates with it so that no
    /// driver can simplify the algebra away (shaders/basis.wgsl).
    BasisParams {
        rows: u32, stride: u32, vectors: u32, segments: u32,
        seg_rows: u32, zero: u32, _p1: u32, _p2: u32,
    }
}

/// Every params struct, for the reflection test: (WGSL name, members).
pub fn all() -> Vec<(&'static str, Vec<(&'static str, usize)>)> {
    fn e<P: KernelParams>() -> (&'static str, Vec<(&'static str, usize)>) {
        (P::WGSL_NAME, P::members())
    }
    vec![
        e::<ConvParams>(),
        e::<BnParams>(),
        e::<ReduceParams>(),
        e::<EwParams>(),
        e::<PoolParams>(),
        e::<ChannelParams>(),
        e::<LossParams>(),
        e::<ActParams>(),
        e::<LnParams>(),
        e::<AttnParams>(),
        e::<EmbParams>(),
        e::<SgdParams>(),
        e::<BnRunningParams>(),
        e::<BasisParams>(),
    ]
}
