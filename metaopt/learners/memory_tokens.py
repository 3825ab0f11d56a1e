"""Memory tokens as an explicit few-shot learner: prompt tuning as an inner loop.

Sandler et al. (CVPR 2022) fine-tune a ViT by training only ``m`` memory tokens per layer and a new head.
:class:`MemoryTokens` makes that fine-tuning the inner loop of :class:`~metaopt.learners.InnerLoop`: for each
task, starting from the meta-learned memory ``M_0 [n_layer, m, n_embd]`` (drawn N(0, 0.02²)) and head ``W_0``,

    (M, W) ← (M, W) − α ∇_{M, W} L_τ^support(M, W),   ``steps`` times,

with the ViT backbone fixed inside the loop and shared by every task, then the queries are predicted through
the adapted memory and head. The backbone, ``M_0`` and ``W_0`` are meta-learned through the unroll (as ANIL's
body, Raghu et al. 2020), or the backbone comes pretrained and frozen (``pretrain=`` or ``pretrained=``,
``freeze_backbone=``), which is the paper's setting. The same image episodes feed MAML, ANIL, ProtoNet and the
HyperTransformer, so ``compare`` puts prompt tuning beside them.

``pretrain=`` pretrains the backbone on glyph classes of the train split exactly as
:func:`metaopt.finetune.memory_token_study` does (same settings, same seed, same cache), on first use rather
than at build time, so that building a recipe stays cheap; a ``pretrained`` flag in the state dict tells a
learner loaded from a checkpoint that its backbone is already there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metaopt.checks import boolean, positive_float, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Example
from metaopt.learners.inner_loop import InnerLoop
from metaopt.learners.vit import MemoryViT, ViT
from metaopt.seeds import item_seed
from optimizers import sgd

PRETRAIN_KEYS = ("classes", "per_class", "steps", "batch_size", "lr")
"""What ``pretrain=`` holds: :func:`metaopt.finetune.pretrained_vit`'s pretraining settings."""

ADAPTED = ("memory", "new_head")
"""The parameters the inner loop adapts: the memory tokens and the head (:class:`metaopt.learners.vit.MemoryViT`)."""


class MemoryTokens(InnerLoop):
    """A ViT few-shot learner whose inner loop adapts only its memory tokens and head (prompt tuning).

    Args:
        ways: classes per task (the head's outputs).
        image_size, patch_size, in_channels, n_embd, n_layer, n_head, mlp_ratio: the ViT (:class:`ViT`).
        memory_tokens: m memory tokens per layer.
        steps, inner_lr: the inner loop's SGD steps and step size.
        first_order: treat the inner gradients as constants.
        pretrained: a file holding a ViT ``state_dict`` (e.g. the pretraining cache of
            :func:`metaopt.finetune.pretrained_vit`) to start the backbone from; its head is not used.
        pretrain: pretrain the backbone on first use instead: ``classes``, ``per_class``, ``steps``,
            ``batch_size``, ``lr`` (the ``memory_tokens`` recipe's study settings share its cached ViT).
        seed: the recipe's seed, from which the pretraining seed is derived as the study derives it.
        cache_dir: where ``pretrain=`` caches the pretrained ViT (None: pretrained afresh, not cached).
        freeze_backbone: keep the backbone fixed in meta-training too (only ``M_0`` and ``W_0`` are meta-learned).
        strategy: how the inner loop is vectorised over tasks (:class:`InnerLoop`); "batched" (vmapped
            attention, the patch convolution shared) is the fastest here.
    """

    kinds = ("classification",)

    @classmethod
    def example(cls) -> Example:
        from metaopt.tasks.images.few_shot import FewShotImages

        return Example(cls(ways=2, image_size=16, patch_size=8, n_embd=16, n_layer=1, n_head=2, memory_tokens=2,
                           steps=1), FewShotImages.example())

    def __init__(self, ways: int = 5, *, image_size: int = 28, patch_size: int = 7, in_channels: int = 1,
                 n_embd: int = 32, n_layer: int = 3, n_head: int = 4, mlp_ratio: int = 2, memory_tokens: int = 4,
                 steps: int = 5, inner_lr: float = 0.4, first_order: bool = False, pretrained: str | None = None,
                 pretrain: dict[str, Any] | None = None, seed: int = 0, cache_dir: str | None = None,
                 freeze_backbone: bool = False, strategy: str = "batched") -> None:
        if pretrain is not None:
            if pretrained is not None:
                raise ValueError("MemoryTokens: give pretrained= (a file) or pretrain= (settings), not both")
            pretrain = dict(pretrain)
            if sorted(pretrain) != sorted(PRETRAIN_KEYS):
                raise ValueError(f"MemoryTokens: pretrain takes exactly {list(PRETRAIN_KEYS)}; got {sorted(pretrain)}")
            for key in ("classes", "per_class", "steps", "batch_size"):
                positive_int(f"pretrain.{key}", pretrain[key], owner="MemoryTokens")
            positive_float("pretrain.lr", pretrain["lr"], owner="MemoryTokens")
        self._vit = {"image_size": image_size, "patch_size": patch_size, "in_channels": in_channels,
                     "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "mlp_ratio": mlp_ratio}
        backbone = ViT(**self._vit, num_classes=None)
        if pretrained is not None:
            path = Path(pretrained)
            if not path.is_file():
                raise ValueError(f"MemoryTokens: pretrained={pretrained!r} is not a file; expected a ViT state_dict "
                                 "saved by metaopt.finetune.pretrained_vit")
            state = torch.load(path, map_location="cpu", weights_only=True)
            backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
        if boolean("freeze_backbone", freeze_backbone, owner="MemoryTokens"):
            backbone.requires_grad_(False)
        model = MemoryViT(backbone, positive_int("memory_tokens", memory_tokens, owner="MemoryTokens"),
                          positive_int("ways", ways, owner="MemoryTokens"))
        super().__init__(model, sgd(positive_float("inner_lr", inner_lr, owner="MemoryTokens")), steps,
                         init="meta", first_order=first_order, strategy=strategy, adapt=list(ADAPTED))
        self._pretraining, self.seed, self.cache_dir = pretrain, seed, cache_dir
        self.register_buffer("pretrained", torch.tensor(pretrain is None))

    def ensure_pretrained(self) -> None:
        """Pretrain the backbone (or load it from ``cache_dir``) if ``pretrain=`` asks and it is not done yet."""
        if bool(self.pretrained):
            return
        from metaopt.finetune import PRETRAIN_SEED_INDEX, pretrained_vit  # the study module builds on this one

        with torch.random.fork_rng(), torch.enable_grad():  # pretraining seeds torch: not the caller's stream
            model, _, _ = pretrained_vit(self._vit, seed=item_seed(self.seed, PRETRAIN_SEED_INDEX),
                                         cache_dir=self.cache_dir, **self._pretraining)
        backbone = self.model.backbone
        with torch.no_grad():
            backbone.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
        self.pretrained.fill_(True)

    def forward(self, episode: Episode) -> Tensor:
        self.ensure_pretrained()
        return super().forward(episode)


__all__ = ["MemoryTokens", "ADAPTED"]
