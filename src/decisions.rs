//! Piecewise decisions — which side of a ReLU/LeakyReLU kink each input is
//! on, which piece of a ReLU6/Hardswish/Hardsigmoid, which element each
//! max-pool window picks — and how fragile a point
//! is in them.
//!
//! A float32 forward pass takes a decision differently from float64
//! wherever the deciding quantity lies within float32 rounding of its
//! threshold; with batch-mode batch norm one such flip is spread over a
//! whole channel, and the gradient and Hv move by up to 5e-3 (torchvision's
//! ResNet-18 on a quarter of the seeds, PyTorch's float32 alike). The GPU
//! engines therefore take their decisions, by default, from the float64
//! reference's forward pass ([`DecisionSource::Float64`]) and replay them in
//! every float32 pass: only the decisions move, every value stays float32.
//!
//! Every report says how many decisions lay within float32 rounding of
//! their threshold ([`NEAR_BAND`]), per layer, and on a GPU engine how many
//! the float32 forward would have taken otherwise.

use crate::layers::{self, CpuCx, Decision};
use crate::model::Model;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a GPU engine's piecewise decisions come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionSource {
    /// The float64 reference's forward pass at the engine's θ, replayed by
    /// every float32 pass (a forward pass on the host per batch, once per
    /// θ; its state serves every product).
    #[default]
    Float64,
    /// The float32 pass's own, as every float32 framework takes them.
    Float32,
}

impl DecisionSource {
    pub fn name(self) -> &'static str {
        match self {
            DecisionSource::Float64 => "float64",
            DecisionSource::Float32 => "float32",
        }
    }
}

/// A decision lies within float32 rounding of its threshold when its
/// margin (`Layer::decide`) is at most this times the root mean square of
/// the unit's input over the batch. Measured (BENCHMARKS.md, "Decisions as
/// float64 takes them"): a GPU's float32 ReLU and max-pool inputs land at
/// most 8.8e-6 to 1.3e-5 of that scale from float64 on torchvision's
/// ResNet-18 (12 seeds and the fixture, Vulkan and GL alike), so 2⁻¹⁴ ≈
/// 6.1e-5, about five times the largest, holds every decision a float32
/// pass could take the other way by rounding alone.
pub const NEAR_BAND: f64 = 1.0 / 16384.0;

/// One piecewise layer's decisions over the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerDecisions {
    /// The layer's module name (its kind where it has none).
    pub layer: String,
    /// `relu`, `leaky_relu`, `relu6`, `hardswish`, `hardsigmoid` or
    /// `maxpool`.
    pub kind: String,
    /// Decisions taken (elements, or windows).
    pub decisions: u64,
    /// Of those, within float32 rounding of the threshold ([`NEAR_BAND`]).
    pub near: u64,
    /// Of those, how many a float32 forward pass takes otherwise than
    /// float64 (GPU engines taking float64 decisions; None elsewhere).
    pub flipped: Option<u64>,
}

/// The decisions of a problem at one θ: where they came from and how
/// fragile they are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionReport {
    pub source: DecisionSource,
    /// What `near` counts, in words.
    pub near_means: String,
    pub decisions: u64,
    pub near: u64,
    pub flipped: Option<u64>,
    pub layers: Vec<LayerDecisions>,
    /// Wall seconds spent taking and counting them (the float64 forward
    /// pass over the data; on a GPU engine also a float32 one to count
    /// flips), once per θ.
    pub seconds: f64,
}

impl DecisionReport {
    /// One line for the text output.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "decisions: {} taken as {} does, {} within float32 rounding of their threshold",
            self.decisions,
            self.source.name(),
            self.near
        );
        if let Some(f) = self.flipped {
            s.push_str(&format!(
                ", {f} of them taken otherwise by a float32 forward pass"
            ));
        }
        s.push_str(&format!(" [{:.2} s]", self.seconds));
        let fragile: Vec<String> = self
            .layers
            .iter()
            .filter(|l| l.near > 0)
            .map(|l| format!("{} {}", l.layer, l.near))
            .collect();
        if !fragile.is_empty() {
            s.push_str(&format!(" ({})", fragile.join(", ")));
        }
        s
    }
}

#[derive(Clone, Debug, Default)]
struct NodeTally {
    decisions: u64,
    near: u64,
    flipped: u64,
}

/// Counts of decisions, near ones and flips per piecewise node, summed
/// over batches.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    nodes: BTreeMap<usize, NodeTally>,
    flips_counted: bool,
}

impl Tally {
    /// Adds node `ni`'s decisions on input `x` with their `margins`.
    pub fn add(&mut self, ni: usize, x: &[f64], margins: &[f64]) {
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / x.len().max(1) as f64).sqrt();
        let band = NEAR_BAND * rms;
        let t = self.nodes.entry(ni).or_default();
        t.decisions += margins.len() as u64;
        // A NaN margin (undecidable) counts as near.
        t.near += margins.iter().filter(|m| m.is_nan() || **m <= band).count() as u64;
    }

    /// Adds the decisions of node `ni` where `a` and `b` differ.
    pub fn add_flips(&mut self, ni: usize, a: &Decision, b: &Decision) {
        self.flips_counted = true;
        let n = match (a, b) {
            (Decision::Mask(p), Decision::Mask(q)) => {
                p.iter().zip(q).filter(|(x, y)| x != y).count() + p.len().abs_diff(q.len())
            }
            (Decision::Argmax(p), Decision::Argmax(q)) => {
                p.iter().zip(q).filter(|(x, y)| x != y).count() + p.len().abs_diff(q.len())
            }
            (Decision::Piece(p), Decision::Piece(q)) => {
                p.iter().zip(q).filter(|(x, y)| x != y).count() + p.len().abs_diff(q.len())
            }
            _ => 0,
        };
        self.nodes.entry(ni).or_default().flipped += n as u64;
    }

    /// Whether any piecewise node was counted.
    pub fn has_layers(&self) -> bool {
        !self.nodes.is_empty()
    }

    pub fn merge(&mut self, other: Tally) {
        self.flips_counted |= other.flips_counted;
        for (ni, t) in other.nodes {
            let e = self.nodes.entry(ni).or_default();
            e.decisions += t.decisions;
            e.near += t.near;
            e.flipped += t.flipped;
        }
    }

    /// Keeps the near counts of `self` and takes the flips of `other`.
    pub fn with_flips_of(mut self, other: &Tally) -> Tally {
        self.flips_counted = other.flips_counted;
        for (ni, t) in &other.nodes {
            self.nodes.entry(*ni).or_default().flipped = t.flipped;
        }
        self
    }

    pub fn report(&self, model: &Model, source: DecisionSource, seconds: f64) -> DecisionReport {
        let flips = self.flips_counted;
        let layers: Vec<LayerDecisions> = self
            .nodes
            .iter()
            .map(|(&ni, t)| {
                let node = &model.nodes[ni];
                LayerDecisions {
                    layer: label(model, ni),
                    kind: node.kind().to_string(),
                    decisions: t.decisions,
                    near: t.near,
                    flipped: flips.then_some(t.flipped),
                }
            })
            .collect();
        DecisionReport {
            source,
            near_means: format!(
                "margin (distance to the nearest kink of an activation, |x| for a ReLU; best minus \
                 runner-up in a max-pool window) at most \
                 {NEAR_BAND:.3e} of the root mean square of the layer's input over its batch"
            ),
            decisions: layers.iter().map(|l| l.decisions).sum(),
            near: layers.iter().map(|l| l.near).sum(),
            flipped: flips.then(|| layers.iter().filter_map(|l| l.flipped).sum()),
            layers,
            seconds,
        }
    }
}

/// A piecewise node's name in reports: its module name, else its kind
/// and the layer that feeds it (`relu after layer1.0.bn1`).
pub fn label(model: &Model, ni: usize) -> String {
    let node = &model.nodes[ni];
    if !node.name.is_empty() {
        return node.name.clone();
    }
    let mut v = node.inputs.first().copied().unwrap_or(0);
    // Walk back over unnamed producers (flatten) to a named layer.
    while v > 0 {
        let p = &model.nodes[v - 1];
        if !p.name.is_empty() {
            return format!("{} after {}", node.kind(), p.name);
        }
        v = p.inputs.first().copied().unwrap_or(0);
    }
    format!("{} after the input", node.kind())
}

/// The decisions of one batch's piecewise nodes, given each node's input
/// (`input(ni)`, by node index: the values of `model.nodes[ni].inputs[0]`
/// in any precision, as f64): per node ([`Decision::None`] for smooth
/// ones), and their tally.
pub fn decide_batch<'a>(
    cx: &CpuCx,
    model: &Model,
    mut input: impl FnMut(usize) -> Option<&'a [f64]>,
) -> (Vec<Decision>, Tally) {
    let mut tally = Tally::default();
    let decisions = model
        .nodes
        .iter()
        .enumerate()
        .map(|(ni, node)| {
            let unit = layers::unit(&node.op);
            if !unit.decides(node) {
                return Decision::None;
            }
            let Some(x) = input(ni) else {
                return Decision::None;
            };
            match unit.decide(cx, node, x) {
                Some((d, margins)) => {
                    tally.add(ni, x, &margins);
                    d
                }
                None => Decision::None,
            }
        })
        .collect();
    (decisions, tally)
}
