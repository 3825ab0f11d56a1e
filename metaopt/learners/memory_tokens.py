"""Memory tokens as an explicit few-shot learner: prompt tuning as an inner loop.

Sandler et al. (CVPR 2022) fine-tune a ViT by training only ``m`` memory tokens per layer and a new head.
:class:`MemoryTokens` makes that fine-tuning the inner loop of :class:`~metaopt.learners.InnerLoop`: for each
task, starting from the meta-learned memory ``M_0 [n_layer, m, n_embd]`` (drawn N(0, 0.02²)) and head ``W_0``,

    (M, W) ← (M, W) − α ∇_{M, W} L_τ^support(M, W),   ``steps`` times,

with the ViT backbone fixed inside the loop and shared by every task, then the queries are predicted through
the adapted memory and head. The backbone, ``M_0`` and ``W_0`` are meta-learned through the unroll (as ANIL's
body, Raghu et al. 2020), or the backbone comes pretrained and frozen (``pretrained=``, ``freeze_backbone=``),
which is the paper's setting. The same image episodes feed MAML, ANIL, ProtoNet and the HyperTransformer, so
``compare`` puts prompt tuning beside them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from metaopt.checks import boolean, positive_float, positive_int
from metaopt.learners.base import Example
from metaopt.learners.inner_loop import InnerLoop
from metaopt.learners.vit import MemoryViT, ViT
from optimizers import sgd

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
                 freeze_backbone: bool = False, strategy: str = "batched") -> None:
        backbone = ViT(image_size, patch_size, in_channels, None, n_embd, n_layer, n_head, mlp_ratio)
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


__all__ = ["MemoryTokens", "ADAPTED"]
