"""The fifteen torchvision CNNs of issue 26 (item 4) and ConvNeXt-tiny
(issue 25), built as the checks use them: 10 classes, BN affine parameters
and running statistics perturbed (so that batch and running modes differ),
LayerNorm affine parameters and ConvNeXt's layer scale perturbed, a fixed
seed. Shared by
export_all.py and check_models.py."""
import torch
import torch.nn as nn
import torchvision

MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "alexnet",
    "squeezenet1_1", "densenet121", "googlenet", "mobilenet_v2", "mobilenet_v3_small",
    "mnasnet0_5", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x0_5",
]

# Checked by check_models.py beside the fifteen (issue 25): ConvNeXt's
# channel LayerNorm, depthwise 7×7 and layer scale. Not in MODELS, whose
# exports export_all.py holds to model.parameters() order (ConvNeXt's
# layer_scale comes first in its block but is read last).
EXTRA_MODELS = ["convnext_tiny"]

# Factory keyword arguments besides num_classes.
KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}


def build(name, seed=5):
    """torchvision.models.NAME(num_classes=10, ...), BN perturbed."""
    torch.manual_seed(seed)
    m = getattr(torchvision.models, name)(num_classes=10, **KWARGS.get(name, {}))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.2, 0.2)
            # ConvNeXt's layer scale (1e-6 at init) away from 0, so that its
            # second-order terms matter.
            if isinstance(getattr(mod, "layer_scale", None), nn.Parameter):
                mod.layer_scale.normal_(0.5, 0.1)
    return m.eval()


class ClampHardswish(nn.Module):
    """x·clamp(x/6 + 1/2, 0, 1): nn.Hardswish's values and kink derivatives,
    but twice differentiable by autograd (PyTorch has no derivative for
    aten::hardswish_backward / hardsigmoid_backward)."""

    def forward(self, x):
        return x * torch.clamp(x / 6 + 0.5, 0, 1)


class ClampHardsigmoid(nn.Module):
    def forward(self, x):
        return torch.clamp(x / 6 + 0.5, 0, 1)


def clamp_forms(m):
    """Replaces nn.Hardswish / nn.Hardsigmoid modules (and the functional
    hardsigmoid of torchvision's SqueezeExcitation) by the clamp forms, in place."""
    for parent in list(m.modules()):
        for k, child in list(parent.named_children()):
            if isinstance(child, nn.Hardswish):
                setattr(parent, k, ClampHardswish())
            elif isinstance(child, nn.Hardsigmoid):
                setattr(parent, k, ClampHardsigmoid())
    return m


def set_bn_mode(m, batch):
    """Batch norm by batch statistics (train) or running ones (eval); every
    other module in eval mode (dropout and stochastic depth the identity, as
    in hesscope)."""
    for mod in m.modules():
        mod.train(batch and isinstance(mod, nn.modules.batchnorm._BatchNorm))
    return m
