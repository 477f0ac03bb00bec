//! The lowered model: a topologically ordered list of nodes over values.
//! Value 0 is the input batch; node `i` produces value `i + 1`; the last
//! value holds the logits, to which softmax cross-entropy is applied.

/// Per-sample shape of a value: `[c, h, w]`; flat vectors have h = w = 1.
/// A sequence [T, F] (row-major, F fastest, as PyTorch's [B, T, F]) is
/// c = T, h = 1, w = F of kind [`Kind::Seq`]; token ids [T] are c = T,
/// h = w = 1 of kind [`Kind::Ids`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kind: Kind,
}

/// What a value holds per sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An image [c, h, w] or a flat vector [c].
    Image,
    /// A sequence of `c` tokens of `w` features.
    Seq,
    /// `c` token ids (the input of a language model; f64 holds them exactly).
    Ids,
}

impl Shape {
    pub fn new(c: usize, h: usize, w: usize) -> Self {
        Shape {
            c,
            h,
            w,
            kind: Kind::Image,
        }
    }
    /// A sequence of `t` tokens of `f` features.
    pub fn seq(t: usize, f: usize) -> Self {
        Shape {
            c: t,
            h: 1,
            w: f,
            kind: Kind::Seq,
        }
    }
    /// `t` token ids.
    pub fn ids(t: usize) -> Self {
        Shape {
            c: t,
            h: 1,
            w: 1,
            kind: Kind::Ids,
        }
    }
    pub fn is_seq(&self) -> bool {
        self.kind == Kind::Seq
    }
    pub fn is_image(&self) -> bool {
        self.kind == Kind::Image
    }
    /// Tokens of a sequence or of token ids.
    pub fn tokens(&self) -> usize {
        self.c
    }
    /// Features per token of a sequence.
    pub fn features(&self) -> usize {
        self.w
    }
    pub fn numel(&self) -> usize {
        self.c * self.h * self.w
    }
    pub fn spatial(&self) -> usize {
        self.h * self.w
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Kind::Image => write!(f, "[{}, {}, {}]", self.c, self.h, self.w),
            Kind::Seq => write!(f, "sequence [{}, {}]", self.c, self.w),
            Kind::Ids => write!(f, "token ids [{}]", self.c),
        }
    }
}

/// Elementwise activations. ReLU, LeakyReLU, ReLU6 and Hardsigmoid are
/// piecewise linear (f'' = 0); the others have curvature of their own
/// (Hardswish on its middle piece), so the R-backward gains the term
/// f''(x)·ẋ·gy. The piecewise ones take decisions (`crate::decisions`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// max(x, 0); derivative 0 at 0.
    Relu,
    /// x for x > 0, slope·x otherwise; derivative `slope` at 0 (PyTorch).
    LeakyRelu {
        slope: f64,
    },
    Tanh,
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// The exact GELU: x·Φ(x), Φ the standard normal CDF through erf.
    Gelu,
    /// x·sigmoid(x).
    Silu,
    /// GELU in its tanh form, 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
    /// (Hugging Face `gelu_new`, PyTorch approximate='tanh').
    GeluTanh,
    /// min(max(x, 0), 6); derivative 1 on (0, 6), 0 elsewhere, so 0 at
    /// both kinks (PyTorch).
    Relu6,
    /// x·relu6(x + 3)/6: 0 for x ≤ −3, x(x + 3)/6 on (−3, 3), x for x ≥ 3
    /// (derivatives 0 at −3 and 1 at 3, PyTorch's choices).
    Hardswish,
    /// relu6(x + 3)/6: 0 for x ≤ −3, x/6 + 1/2 on (−3, 3), 1 for x ≥ 3
    /// (derivative 0 at both kinks, PyTorch).
    Hardsigmoid,
}

impl Activation {
    /// The `.arch` keyword.
    pub fn keyword(&self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::LeakyRelu { .. } => "leaky_relu",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Relu6 => "relu6",
            Activation::Hardswish => "hardswish",
            Activation::Hardsigmoid => "hardsigmoid",
        }
    }
}

/// Batch norm's default `eps` (PyTorch's BatchNorm2d).
pub const BN_EPS: f64 = 1e-5;

/// Indices are into `Model::params` / `Model::buffers`.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Conv {
        weight: usize,
        bias: Option<usize>,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        /// Conv2d's groups: weight [cout, cin/groups, k, k] (1: dense;
        /// cin = cout = groups: depthwise).
        groups: usize,
        /// Conv2d's dilation: taps `dilation` apart.
        dilation: usize,
    },
    BatchNorm {
        gamma: usize,
        beta: usize,
        running_mean: usize,
        running_var: usize,
        c: usize,
        /// Added to the variance (PyTorch's `eps`; 1e-5 by default,
        /// MobileNetV3's 1e-3).
        eps: f64,
    },
    /// An elementwise activation y = f(x).
    Act(Activation),
    /// MaxPool2d(k, stride, pad, ceil_mode=ceil): `ceil` only sets the
    /// output size (windows past the padded edge take what they cover).
    MaxPool {
        k: usize,
        stride: usize,
        pad: usize,
        ceil: bool,
    },
    /// AvgPool2d(k, stride, pad, ceil_mode=ceil) with count_include_pad:
    /// every window is divided by the number of its elements inside the
    /// padded input (k·k, except for the windows ceil_mode lets run past
    /// the padded edge, as PyTorch).
    AvgPool {
        k: usize,
        stride: usize,
        pad: usize,
        ceil: bool,
    },
    GlobalAvgPool,
    Flatten,
    Linear {
        weight: usize,
        bias: Option<usize>,
        din: usize,
        dout: usize,
    },
    /// Residual add of two values of the same shape.
    Add,
    /// Concatenation along channels of two or more values of equal h, w
    /// (torch.cat(dim=1)); the inputs' channel counts are their shapes'.
    Concat,
    /// Channels [start, start + len) of the input (torch.narrow, chunk or
    /// split along dim 1).
    Narrow {
        start: usize,
        len: usize,
    },
    /// ShuffleNet's channel shuffle: view(n, groups, c/groups, h, w),
    /// transpose(1, 2), reshape(n, c, h, w).
    ChannelShuffle {
        groups: usize,
    },
    /// y = x·s of the inputs (x, s): s of x's shape, or s [c, 1, 1]
    /// broadcast over x's h, w (squeeze-and-excitation).
    Mul,
    /// AdaptiveAvgPool2d((h, w)): output (i, j) averages input rows
    /// [⌊i·H/h⌋, ⌈(i+1)·H/h⌉) and columns likewise, for any input size.
    AdaptiveAvgPool {
        h: usize,
        w: usize,
    },
    /// nn.Embedding: token ids [T] -> [T, dim], rows of weight [vocab, dim].
    Embedding {
        weight: usize,
        vocab: usize,
        dim: usize,
    },
    /// y = x + the first T·D values of a parameter: GPT-2's learned
    /// position embedding (`pos`: `pos_embedding`, weight [rows, D]) or
    /// ViT's raw [1, T, D] `add_param`.
    AddParam {
        param: usize,
        pos: bool,
    },
    /// Prepends the parameter [1, 1, D] as token 0: [T, D] -> [T+1, D].
    ClsToken {
        param: usize,
    },
    /// Image [C, H, W] -> sequence [H·W, C].
    Tokens,
    /// Sequence [H·W, C] -> image [C, H, W], the inverse of `Tokens`
    /// (ConvNeXt's permute(0, 3, 1, 2) after its channels-last layers).
    Untokens {
        h: usize,
        w: usize,
    },
    /// y = x·P of an image [C, H, W] and a raw parameter P [C, 1, 1]
    /// broadcast over the batch and H, W (ConvNeXt's `layer_scale`).
    MulParam {
        param: usize,
    },
    /// Token `index` of a sequence [T, D] -> flat [D].
    Select {
        index: usize,
    },
    /// nn.LayerNorm(dim) over the last dimension of a sequence.
    LayerNorm {
        weight: usize,
        bias: usize,
        dim: usize,
        eps: f64,
    },
    /// A linear map on the last dimension of a sequence: weight [dout, din]
    /// (nn.Linear), or [din, dout] when `transposed` (Hugging Face Conv1D).
    SeqLinear {
        weight: usize,
        bias: Option<usize>,
        din: usize,
        dout: usize,
        transposed: bool,
    },
    /// Multi-head softmax attention, parameter-free: one input [T, 3D]
    /// (q | k | v along the features) or three [T, D]; -> [T, D].
    Mha {
        heads: usize,
        causal: bool,
    },
}

#[derive(Clone, Debug)]
pub struct Node {
    /// Module name (`layer1.0.conv1`); empty for anonymous parameter-free ops.
    pub name: String,
    pub op: Op,
    /// Value ids this node reads (one; two for `Add` and `Mul`; two or
    /// more for `Concat`). `in_shape` is the first one's shape.
    pub inputs: Vec<usize>,
    pub in_shape: Shape,
    pub out_shape: Shape,
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match self.op {
            Op::Conv { .. } => "conv",
            Op::BatchNorm { .. } => "bn",
            Op::Act(a) => a.keyword(),
            Op::MaxPool { .. } => "maxpool",
            Op::AvgPool { .. } => "avgpool",
            Op::GlobalAvgPool => "gap",
            Op::Flatten => "flatten",
            Op::Linear { .. } => "linear",
            Op::Add => "add",
            Op::Concat => "concat",
            Op::Narrow { .. } => "narrow",
            Op::ChannelShuffle { .. } => "shuffle",
            Op::Mul => "mul",
            Op::AdaptiveAvgPool { .. } => "adaptive_avgpool",
            Op::Embedding { .. } => "embedding",
            Op::AddParam { pos: true, .. } => "pos_embedding",
            Op::AddParam { pos: false, .. } => "add_param",
            Op::ClsToken { .. } => "cls_token",
            Op::Tokens => "tokens",
            Op::Untokens { .. } => "untokens",
            Op::MulParam { .. } => "mul_param",
            Op::Select { .. } => "select",
            Op::LayerNorm { .. } => "layernorm",
            Op::SeqLinear {
                transposed: true, ..
            } => "conv1d",
            Op::SeqLinear { .. } => "linear",
            Op::Mha { .. } => "mha",
        }
    }
}

/// How a trainable tensor is initialised without weights (PyTorch defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)): kaiming_uniform(a=sqrt(5)) for
    /// conv/linear weights, and their biases.
    UniformFanIn(usize),
    /// U(-bound, bound): xavier_uniform_ (nn.MultiheadAttention's
    /// in_proj_weight: bound = sqrt(6 / (fan_in + fan_out))).
    Uniform {
        bound: f64,
    },
    /// N(0, std²): nn.Embedding's default (std 1), Hugging Face Conv1D's
    /// weight and torchvision ViT's pos_embedding (std 0.02).
    Normal {
        std: f64,
    },
    Const(f64),
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// PyTorch state_dict name.
    pub name: String,
    /// PyTorch shape.
    pub shape: Vec<usize>,
    /// Offset in the flat parameter vector (PyTorch registration order).
    pub offset: usize,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The module this tensor belongs to: the name before the last '.'.
    pub fn module(&self) -> &str {
        self.name.rsplit_once('.').map(|(m, _)| m).unwrap_or("")
    }
}

/// Non-trainable state (BN running statistics).
#[derive(Clone, Debug)]
pub struct BufferSpec {
    pub name: String,
    pub len: usize,
    pub init: f64,
}
