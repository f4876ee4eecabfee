"""`ClassificationModule`: any zoo or timm classifier, trained the way the papers do.

The network stays a plain `nn.Module` (`self.model`), so a checkpoint exports to the
model's own layout. AdamW without decay on biases, norms, `rpb` and the model's
`no_weight_decay()`; warmup + cosine per iteration; label smoothing; timm Mixup/CutMix;
top-1 / top-5 on validation.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._compat import pl
from .optim import configure_adamw, no_weight_decay_names


def create_classifier(name: str, num_classes: int, in_chans: int, pretrained: bool = False,
                      checkpoint_path: str | None = None, **kwargs: Any) -> nn.Module:
    """A zoo classifier by name, or one of timm's own (unknown names list the closest zoo names)."""
    import zoo

    return zoo.create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path,
                            num_classes=num_classes, in_chans=in_chans, **kwargs)


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """Fraction of rows whose target is among the k highest logits, for each k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[-1])
    top = logits.topk(maxk, dim=-1).indices
    hit = top.eq(target[:, None])
    return [hit[:, :min(k, maxk)].any(dim=-1).float().mean() for k in ks]


class ClassificationModule(pl.LightningModule):
    """Train a classifier named `model_name` (zoo or timm), or a given `model`.

    Args:
        model_name: registry name, e.g. `nat_mini` or `resnet18`.
        num_classes, in_chans: passed to the model constructor.
        model_kwargs: other constructor arguments (`img_size`, `drop_path_rate`, `depths`, ...).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW and the per-step schedule.
        no_weight_decay: parameter-name keywords kept out of weight decay (besides 1-D params).
        label_smoothing, mixup, cutmix, mixup_prob: regularisation; Mixup/CutMix use timm.
        model: an already built network (then `model_name` only labels exports).
    """

    def __init__(self, model_name: str, num_classes: int = 10, in_chans: int = 3, model_kwargs: dict | None = None,
                 pretrained: bool = False, checkpoint_path: str | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.05, betas: Sequence[float] = (0.9, 0.999), warmup_steps: int = 100,
                 min_lr_ratio: float = 0.01, no_weight_decay: Sequence[str] = ("rpb", "relative_position_bias_table", "pos_embed", "cls_token"),
                 label_smoothing: float = 0.1, mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0,
                 model: nn.Module | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model if model is not None else create_classifier(
            model_name, num_classes, in_chans, pretrained, checkpoint_path, **dict(model_kwargs or {}))
        # decided here, on the unwrapped network: under FSDP the parameters are flat shards when optimizers are made
        self.no_decay_names = no_weight_decay_names(self.model, no_weight_decay)
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                  label_smoothing=label_smoothing, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup_fn is not None:
            x, soft = self.mixup_fn(x, y)
            logits = self.model(x)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x).float()
        top1, top5 = topk_accuracy(logits, y, (1, 5))
        n = x.shape[0]
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=n, sync_dist=True)
        self.log("val/top1", top1, batch_size=n, prog_bar=True, sync_dist=True)
        self.log("val/top5", top5, batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        h = self.hparams
        return configure_adamw(self, self.model, h.lr, h.weight_decay, h.betas, h.warmup_steps, h.min_lr_ratio, h.no_weight_decay)
