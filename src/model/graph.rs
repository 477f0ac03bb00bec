//! The lowered model: a topologically ordered list of nodes over values.
//! Value 0 is the input batch; node `i` produces value `i + 1`; the last
//! value holds the logits, to which softmax cross-entropy is applied.

/// Per-sample shape of a value: `[c, h, w]`; flat vectors have h = w = 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub fn new(c: usize, h: usize, w: usize) -> Self {
        Shape { c, h, w }
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
        write!(f, "[{}, {}, {}]", self.c, self.h, self.w)
    }
}

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
    },
    BatchNorm {
        gamma: usize,
        beta: usize,
        running_mean: usize,
        running_var: usize,
        c: usize,
    },
    Relu,
    MaxPool {
        k: usize,
        stride: usize,
        pad: usize,
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
}

#[derive(Clone, Debug)]
pub struct Node {
    /// Module name (`layer1.0.conv1`); empty for anonymous parameter-free ops.
    pub name: String,
    pub op: Op,
    /// Value ids this node reads (one, or two for `Add`).
    pub inputs: Vec<usize>,
    pub in_shape: Shape,
    pub out_shape: Shape,
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match self.op {
            Op::Conv { .. } => "conv",
            Op::BatchNorm { .. } => "bn",
            Op::Relu => "relu",
            Op::MaxPool { .. } => "maxpool",
            Op::GlobalAvgPool => "gap",
            Op::Flatten => "flatten",
            Op::Linear { .. } => "linear",
            Op::Add => "add",
        }
    }
}

/// How a trainable tensor is initialised without weights (PyTorch defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)): kaiming_uniform(a=sqrt(5)) for
    /// conv/linear weights, and their biases.
    UniformFanIn(usize),
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
