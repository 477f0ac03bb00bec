"""PyTorch definitions of hesscope's reference models (../../../shared/spec/architectures.md),
with exactly the state_dict names hesscope loads. Used by the PyTorch peer benchmark and to
export weights a user would bring."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, bn=True, shortcut_name="shortcut"):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        self.bn2 = norm(cout)
        sc = nn.Sequential()
        if stride != 1 or cin != cout:
            sc = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=not bn), *([nn.BatchNorm2d(cout)] if bn else []))
        self.shortcut_name = shortcut_name
        setattr(self, shortcut_name, sc)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + getattr(self, self.shortcut_name)(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks, bn=True, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(16) if bn else nn.Identity()
        cin = 16
        for s, c in enumerate([16, 32, 64], start=1):
            layer = []
            for b in range(blocks):
                stride = 2 if (b == 0 and s > 1) else 1
                layer.append(BasicBlock(cin, c, stride, bn))
                cin = c
            setattr(self, f"layer{s}", nn.Sequential(*layer))
        self.linear = nn.Linear(64, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean(dim=(2, 3)))


class ResNet18(nn.Module):
    """torchvision's resnet18 layout and names (downsample.0/1)."""

    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for s, c in enumerate([64, 128, 256, 512], start=1):
            layer = []
            for b in range(2):
                stride = 2 if (b == 0 and s > 1) else 1
                layer.append(BasicBlock(cin, c, stride, True, "downsample"))
                cin = c
            setattr(self, f"layer{s}", nn.Sequential(*layer))
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(x.mean(dim=(2, 3)))


class VGG11(nn.Module):
    def __init__(self, bn=True, classes=10):
        super().__init__()
        layers, cin = [], 3
        for c in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.Conv2d(cin, c, 3, 1, 1, bias=True))
                if bn:
                    layers.append(nn.BatchNorm2d(c))
                layers.append(nn.ReLU())
                cin = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class CnnTiny(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.block1 = BasicBlock(4, 4, 1, bn)
        self.block2 = BasicBlock(4, 8, 2, bn)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.block2(self.block1(x))
        return self.fc(x.mean(dim=(2, 3)))


class MlpTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(36, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """The LeNet-5 of Sankar et al. (2021): ReLU and 2x2 max pools."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, 1, 2, bias=True)
        self.conv2 = nn.Conv2d(6, 16, 5, 1, 0, bias=True)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.relu(self.fc2(x)))


class SmoothBlock(nn.Module):
    """out = x + silu(conv(x))."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, bias=True)

    def forward(self, x):
        return x + F.silu(self.conv(x))


class CnnSmooth(nn.Module):
    """Every op beyond ReLU: tanh, AvgPool2d, GELU (exact), SiLU, LeakyReLU(0.1), sigmoid."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(6, 8, 3, 1, 1, bias=True)
        self.block = SmoothBlock(8)
        self.fc1, self.fc2 = nn.Linear(128, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = F.avg_pool2d(torch.tanh(self.conv1(x)), 2, 2)
        x = self.block(F.gelu(self.conv2(x)))
        x = F.leaky_relu(x, 0.1)
        return self.fc2(torch.sigmoid(self.fc1(torch.flatten(x, 1))))


MODELS = {
    "mlp-tiny": (MlpTiny, (1, 6, 6), 4),
    "cnn-tiny": (lambda: CnnTiny(True), (3, 8, 8), 4),
    "cnn-tiny-nobn": (lambda: CnnTiny(False), (3, 8, 8), 4),
    "resnet20": (lambda: CifarResNet(3, True), (3, 32, 32), 10),
    "resnet20-nobn": (lambda: CifarResNet(3, False), (3, 32, 32), 10),
    "resnet32": (lambda: CifarResNet(5, True), (3, 32, 32), 10),
    "resnet32-nobn": (lambda: CifarResNet(5, False), (3, 32, 32), 10),
    "vgg11-bn": (lambda: VGG11(True), (3, 32, 32), 10),
    "vgg11": (lambda: VGG11(False), (3, 32, 32), 10),
    "resnet18": (ResNet18, (3, 224, 224), 1000),
    "lenet5": (LeNet5, (1, 28, 28), 10),
    "cnn-smooth": (CnnSmooth, (3, 8, 8), 4),
}


def build(name):
    ctor, shape, classes = MODELS[name]
    return ctor(), shape, classes
