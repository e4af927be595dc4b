"""Local models with torchvision's structure, at tiny widths, for the tests.

torchvision does not import beside the pinned CPU torch 2.13.0 here (PyPI's torchvision
needs a newer torch: 'operator torchvision::nms does not exist'), so the tests use these:
the same module names and the same forward as torchvision.models' resnet18/34/50 and
mobilenet_v2 (conv stem, layer1..layer4 of BasicBlocks or Bottlenecks, avgpool, fc;
MobileNetV2's `features` of inverted residuals ending in a 1x1 conv to `last_channel`,
then `classifier` = Dropout + Linear), with every width divided by `width_div`.
`torchvision_standin()` packages them as a `torchvision` module with `models`.
"""
from __future__ import annotations

import types
from typing import List, Optional

import torch
from torch import nn


def conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, c, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, c, stride), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(c, c), nn.BatchNorm2d(c)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, c, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = conv3x3(c, c, stride), nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet's layout: x (B, 3, H, W) -> logits (B, num_classes);
    layer4's output (B, 8*w*expansion, H/32, W/32) goes to avgpool and fc."""

    def __init__(self, block, layers: List[int], num_classes=1000, width_div=8):
        super().__init__()
        w = 64 // width_div
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, w, layers[0])
        self.layer2 = self._make_layer(block, 2 * w, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * w, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * w, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * w * block.expansion, num_classes)

    def _make_layer(self, block, c, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != c * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, c * block.expansion, 1, stride,
                                                 bias=False), nn.BatchNorm2d(c * block.expansion))
        layers = [block(self.inplanes, c, stride, downsample)]
        self.inplanes = c * block.expansion
        layers += [block(self.inplanes, c) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_bn_relu6(c_in, c_out, kernel=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand_ratio):
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_res_connect = stride == 1 and c_in == c_out
        layers = [conv_bn_relu6(c_in, hidden, 1)] if expand_ratio != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.MobileNetV2's layout: `features` (stem, 17 inverted residuals,
    1x1 conv to last_channel) -> adaptive avg pool -> `classifier` (Dropout, Linear)."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=1000, width_div=8, dropout=0.2):
        super().__init__()
        c = max(32 // width_div, 2)
        self.last_channel = 1280 // width_div
        features: List[nn.Module] = [conv_bn_relu6(3, c, stride=2)]
        for t, ch, n, s in self.SETTINGS:
            out = max(ch // width_div, 2)
            for i in range(n):
                features.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        features.append(conv_bn_relu6(c, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel,
                                                                       num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def resnet18(weights=None, num_classes=1000, width_div=8):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width_div)


def resnet34(weights=None, num_classes=1000, width_div=8):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, width_div)


def resnet50(weights=None, num_classes=1000, width_div=8):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width_div)


def mobilenet_v2(weights=None, num_classes=1000, width_div=8):
    return MobileNetV2(num_classes, width_div)


def torchvision_standin(width_div: int = 8) -> types.ModuleType:
    """A module standing in for `torchvision` (only `torchvision.models.resnet18/34/50,
    mobilenet_v2`, random weights only), at widths divided by `width_div`."""
    def at_width(fn):
        def make(weights: Optional[object] = None, num_classes: int = 1000):
            if weights is not None:
                raise ValueError("the torchvision stand-in has no pretrained weights")
            return fn(num_classes=num_classes, width_div=width_div)
        make.__name__ = fn.__name__
        return make

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    for fn in (resnet18, resnet34, resnet50, mobilenet_v2):
        setattr(tv.models, fn.__name__, at_width(fn))
    tv.__standin__ = True
    return tv
