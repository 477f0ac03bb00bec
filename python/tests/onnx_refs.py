"""Shared by make_onnx_random.py and make_onnx_channels.py: a small CNN
with perturbed batch norms exported by torch unfolded (legacy exporter,
opset 17, training mode, no constant folding, a dynamic batch), its
state_dict, data, a direction v and PyTorch float64 references (loss,
gradient, Hv) in both of hesscope's batch-norm modes."""
import json, os
import torch, torch.nn as nn
from safetensors.torch import save_file


def export(m, path, train, size):
    """torch.onnx.export of m on [2, 3, size, size], training mode without
    constant folding (train) or eval mode with it."""
    mode = torch.onnx.TrainingMode.TRAINING if train else torch.onnx.TrainingMode.EVAL
    torch.onnx.export(m, (torch.zeros(2, 3, size, size),), path, dynamo=False, opset_version=17,
                      training=mode, do_constant_folding=not train, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})


def write_model_and_references(make, onnx_path, d, size, v_seed, prepare):
    """make() the model (under the caller's torch seed), perturb its batch
    norms, export it to onnx_path in training mode (momentum 0, so the
    export leaves the state_dict as it was), and write to d: the
    state_dict, data x [4, 3, size, size] with y [4], v (seeded v_seed)
    and ref-{batch,running}/ with the float64 model prepare(model, batch)
    returns."""
    m = make()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    os.makedirs(d, exist_ok=True)
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.momentum = 0.0
    m.train()
    export(m, onnx_path, True, size)
    for k, t in m.state_dict().items():
        assert k.endswith("num_batches_tracked") or torch.equal(t, sd[k]), f"the export changed {k}"
    save_file(sd, f"{d}/weights.safetensors")
    x = torch.randn(4, 3, size, size) * 2
    y = torch.tensor([0, 3, 1, 4])
    save_file({"x": x, "y": y}, f"{d}/data.safetensors")
    g = torch.Generator().manual_seed(v_seed)
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in m.named_parameters()}
    save_file(v, f"{d}/v.safetensors")
    for bn_mode in ("batch", "running"):
        mm = make()
        mm.load_state_dict(sd)
        mm = prepare(mm, bn_mode == "batch")
        names = [n for n, _ in mm.named_parameters()]
        ps = [p for _, p in mm.named_parameters()]
        loss = nn.functional.cross_entropy(mm(x.double()), y)
        gr = torch.autograd.grad(loss, ps, create_graph=True)
        hv = torch.autograd.grad(sum((a * v[n]).sum() for a, n in zip(gr, names)), ps)
        r = f"{d}/ref-{bn_mode}"
        os.makedirs(r, exist_ok=True)
        save_file({n: t.detach().contiguous() for n, t in zip(names, gr)}, f"{r}/grad.safetensors")
        save_file({n: t.detach().contiguous() for n, t in zip(names, hv)}, f"{r}/hv.safetensors")
        with open(f"{r}/reference.json", "w") as f:
            json.dump({"loss": loss.item(), "bn": bn_mode, "dtype": "float64"}, f, indent=1)
            f.write("\n")
