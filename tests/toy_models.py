"""Tiny registered models for the foundation tests (imported only by tests)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo._registry import register_model
from zoo.factory import build_classifier, load_generator_weights
from zoo.weights import generate_default_cfgs


class ToyNet(nn.Module):
    """Two conv stages + SDPA over the last feature map + linear head (timm model API)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width: int = 8, global_pool: str = "avg", **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, width, 3, stride=2, padding=1)
        self.stage = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.qkv = nn.Linear(2 * width, 6 * width)
        self.num_features = self.head_hidden_size = 2 * width
        self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = [dict(num_chs=width, reduction=2, module="stem"), dict(num_chs=2 * width, reduction=4, module="stage")]

    def forward_features(self, x):
        x = self.stage(F.relu(self.stem(x)))
        b, c, h, w = x.shape
        q, k, v = self.qkv(x.flatten(2).transpose(1, 2)).view(b, h * w, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x.transpose(1, 2).reshape(b, c, h, w)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3)) if self.global_pool else x
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


class ToyGenerator(nn.Module):
    def __init__(self, channels: int = 2, size: int = 8):
        super().__init__()
        self.size, self.channels = size, channels
        self.net = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return self.net(x) * t.view(-1, 1, 1, 1)

    def example_inputs(self, batch_size: int = 1, input_size=None):
        return torch.randn(batch_size, self.channels, self.size, self.size), torch.ones(batch_size)


default_cfgs = generate_default_cfgs({
    "zootest_toynet.untrained": dict(num_classes=1000, input_size=(3, 32, 32), classifier="head", first_conv="stem"),
    "zootest_toygen": dict(),
})


@register_model(paper="a toy for tests")
def zootest_toynet(pretrained: bool = False, **kwargs):
    return build_classifier(ToyNet, "zootest_toynet", pretrained, **kwargs)


@register_model(kind="generator", paper="a toy generator for tests")
def zootest_toygen(pretrained: bool = False, pretrained_tag=None, **kwargs):
    model = ToyGenerator(**kwargs)
    load_generator_weights(model, "zootest_toygen", pretrained, pretrained_tag, None)
    return model
