"""Writes tests/data/tv-resnet18-trunc.exported.arch: the module of
../shared/fixtures/tv-resnet18-trunc/make.py (torchvision's ResNet-18 cut
after layer2.0) exported by hesscope_export, which tests/exporter.rs runs
against the fixture's PyTorch float64 references.
Run from the repository root: PYTHONPATH=python python python/tests/export_fixture.py"""
import torch, torch.nn as nn, torchvision
from hesscope_export import export

m = torchvision.models.resnet18(num_classes=10)
m.layer2 = nn.Sequential(m.layer2[0]); m.layer3 = nn.Identity(); m.layer4 = nn.Identity(); m.fc = nn.Linear(128, 10)
export(m, torch.zeros(2, 3, 64, 64), "tests/data/tv-resnet18-trunc.exported.arch", name="tv-resnet18-trunc")
print("wrote tests/data/tv-resnet18-trunc.exported.arch")
