"""A small Vision Transformer with learnable memory tokens (Sandler, Zhmoginov, Vladymyrov, Jackson, CVPR 2022).

The model (Dosovitskiy et al. 2021, at a CPU's scale): a ``patch_size``-strided convolution embeds the image
as patches, a class token is prepended, learned position embeddings are added, ``n_layer`` pre-norm
transformer blocks (:class:`metaopt.learners.attention.Block`, the project's one block) run, and a linear head
reads the final-normed class token.

**Memory tokens** ("Fine-tuning Image Transformers using Learnable Memory", §3): ``m`` learnable tokens per
layer, ``memory [n_layer, m, n_embd]``, initialised ``N(0, 0.02²)``. Layer ``l`` reads its input sequence
with ``memory[l]`` appended; the other tokens attend to them, and the layer's outputs at the memory positions
are dropped, so memory is never carried to the next layer (:meth:`ViT.forward` with ``memory=``). Fine-tuning
trains the memory and a new head; the backbone stays frozen (:class:`MemoryViT`).

**Non-destructive fine-tuning** (§3.2): a task adds its own class token, memory and head
(:class:`TaskTokens`) under an attention mask that hides them from the original tokens: the original class
and patch tokens attend only to each other, the task's class token attends to the original tokens, itself
and its own memory. The original stream is then exactly the original model, so its output is bit-identical
with and without any number of added tasks, and tasks fine-tuned separately run in one forward pass by
concatenating their tokens (:meth:`ViT.forward_tasks`). The mask is computed block by block: the original
stream runs the very operations of the plain model, and each task's tokens read that stream's keys and
values at every layer without writing back; :func:`masked_reference` is the same computation written as one
masked sequence, which the tests hold it to.
"""

from __future__ import annotations

from collections.abc import Sequence

import math

import torch
from torch import Tensor, nn

from metaopt.checks import non_negative_int, positive_int
from metaopt.learners.attention import Block, MultiHeadAttention

MEMORY_INIT_STD = 0.02  # the paper's N(0, 0.02) initialisation of memory tokens


class ExplicitSoftmaxAttention(MultiHeadAttention):
    """``softmax(q kᵀ / √d) v`` written out, so it is twice differentiable on every device (an inner loop
    differentiates through its gradient; CPU's fused attention kernel has no double backward)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ v


class ViT(nn.Module):
    """A Vision Transformer for images ``[B, C, H, W]``; ``forward`` gives class logits ``[B, num_classes]``.

    Args:
        image_size: the side of the (square) input images; must be a multiple of ``patch_size``.
        patch_size: the side of one patch.
        in_channels: image channels.
        num_classes: the head's outputs; ``None``: no head, ``forward`` gives the features ``[B, n_embd]``.
        n_embd, n_layer, n_head, mlp_ratio: token width, blocks, attention heads, MLP width in units of n_embd.
    """

    def __init__(self, image_size: int = 28, patch_size: int = 7, in_channels: int = 1, num_classes: int | None = 10,
                 n_embd: int = 64, n_layer: int = 4, n_head: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        owner = "ViT"
        image_size, patch_size = positive_int("image_size", image_size, owner=owner), positive_int(
            "patch_size", patch_size, owner=owner)
        if image_size % patch_size:
            raise ValueError(f"ViT: image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size, self.patch_size = image_size, patch_size
        self.n_embd, self.n_layer = positive_int("n_embd", n_embd, owner=owner), positive_int(
            "n_layer", n_layer, owner=owner)
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(positive_int("in_channels", in_channels, owner=owner), n_embd, patch_size,
                                     stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, n_embd) * 0.02)  # as in ViT
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio=mlp_ratio,
                                                 attn_layer=ExplicitSoftmaxAttention) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Identity() if num_classes is None else nn.Linear(
            n_embd, positive_int("num_classes", num_classes, owner=owner))

    def tokens(self, x: Tensor) -> Tensor:
        """The class token and the patch embeddings with positions: ``[B, 1 + P, n_embd]``."""
        if x.dim() != 4 or tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"ViT: expected images [B, C, {self.image_size}, {self.image_size}]; got "
                             f"{tuple(x.shape)}")
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, P, D]
        return torch.cat([self.cls_token.expand(len(x), -1, -1), patches], dim=1) + self.pos_embed

    def features(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        """The final-normed class token ``[B, n_embd]``; ``memory [n_layer, m, n_embd]`` is attended by every
        token of its layer and dropped after it (the paper's memory fine-tuning)."""
        h = self.tokens(x)
        if memory is not None and tuple(memory.shape[::2]) != (self.n_layer, self.n_embd):
            raise ValueError(f"ViT: memory must be [n_layer={self.n_layer}, m, n_embd={self.n_embd}]; got "
                             f"{tuple(memory.shape)}")
        for layer, block in enumerate(self.blocks):
            if memory is None:
                h = block(h)
            else:
                n = h.shape[1]
                mem = memory[layer].expand(len(h), -1, -1)  # [B, m, D]
                h = block(torch.cat([h, mem], dim=1))[:, :n]  # memory outputs are dropped, never carried on
        return self.ln_f(h[:, 0])

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        return self.head(self.features(x, memory))

    def new_task(self, num_classes: int, memory_tokens: int) -> "TaskTokens":
        """A task's tokens for non-destructive fine-tuning: a class token started from this model's, memory, a head."""
        return TaskTokens(self.cls_token.detach()[0, 0], self.n_layer, memory_tokens, num_classes)

    def forward_tasks(self, x: Tensor, tasks: Sequence["TaskTokens"]) -> tuple[Tensor, list[Tensor]]:
        """The original logits and each task's logits, in one pass of the backbone (non-destructive fine-tuning).

        Every task's tokens read the original stream's keys and values at each layer and their own; the original
        stream never reads theirs, so ``forward_tasks(x, tasks)[0]`` is bit-identical to ``forward(x)``.
        """
        h = self.tokens(x)
        extra = [task.cls.expand(len(x), 1, -1) for task in tasks]  # one [B, 1, D] class token per task
        for layer, block in enumerate(self.blocks):
            k, v = _keys_values(block, h)
            h = block(h)
            extra = [_task_token_step(block, e, task.memory[layer], k, v) for e, task in zip(extra, tasks)]
        return self.head(self.ln_f(h[:, 0])), [task.head(self.ln_f(e[:, 0])) for e, task in zip(extra, tasks)]


class TaskTokens(nn.Module):
    """One task of non-destructive fine-tuning: a class token ``cls [1, D]``, ``memory [L, m, D]`` and a head."""

    def __init__(self, class_token: Tensor, n_layer: int, memory_tokens: int, num_classes: int) -> None:
        super().__init__()
        n_embd = class_token.numel()
        self.cls = nn.Parameter(class_token.detach().clone().reshape(1, n_embd))
        self.memory = nn.Parameter(init_memory(n_layer, memory_tokens, n_embd))
        self.head = nn.Linear(n_embd, positive_int("num_classes", num_classes, owner="TaskTokens"))


def init_memory(n_layer: int, memory_tokens: int, n_embd: int) -> Tensor:
    """``[n_layer, m, n_embd]`` memory tokens drawn from N(0, 0.02²), as the paper initialises them."""
    m = non_negative_int("memory_tokens", memory_tokens, owner="init_memory")
    return torch.randn(n_layer, m, n_embd) * MEMORY_INIT_STD


def _heads(block: Block, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values ``[B, H, L, d]`` of the block's attention for its normed input ``h [B, L, D]``."""
    attn = block.attn
    B, L, _ = h.shape
    H, d = attn.n_head, attn.head_dim
    q, k, v = (t.view(B, L, H, d).transpose(1, 2) for t in attn.qkv(h).split(H * d, dim=2))
    return q, k, v


def _keys_values(block: Block, h: Tensor) -> tuple[Tensor, Tensor]:
    """The keys and values the original tokens ``h`` offer at this block (what a task's class token reads)."""
    _, k, v = _heads(block, block.ln_1(h))
    return k, v


def _task_token_step(block: Block, token: Tensor, memory: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One block for a task's class token ``[B, 1, D]``: it attends to the original keys/values ``k, v``, to
    itself and to its ``memory [m, D]`` (which is dropped afterwards); nothing it computes reaches ``k, v``."""
    B = token.shape[0]
    own = torch.cat([token, memory.expand(B, -1, -1)], dim=1)  # [B, 1 + m, D]
    q_own, k_own, v_own = _heads(block, block.ln_1(own))
    keys, values = torch.cat([k, k_own], dim=2), torch.cat([v, v_own], dim=2)  # [B, H, P + 1 + 1 + m, d]
    out = block.attn.attend(q_own[:, :, :1], keys, values, None)  # only the class token's query is kept
    token = token + block.attn.proj(out.transpose(1, 2).reshape(B, 1, -1))
    return token + block.mlp(block.ln_2(token))


def masked_reference(model: ViT, x: Tensor, tasks: Sequence[TaskTokens]) -> tuple[Tensor, list[Tensor]]:
    """:meth:`ViT.forward_tasks` as the paper writes it: one sequence ``[original | class tokens | memories]``
    per layer under the non-destructive attention mask (equal up to rounding; the tests' reference)."""
    h = model.tokens(x)
    B, n = h.shape[:2]
    T, m = len(tasks), tasks[0].memory.shape[1] if tasks else 0
    cls = torch.cat([task.cls.expand(B, 1, -1) for task in tasks], dim=1)  # [B, T, D]
    allowed = torch.zeros(n + T + T * m, n + T + T * m, dtype=torch.bool)
    allowed[:n, :n] = True  # the original tokens see only each other
    for t in range(T):
        row, memory = n + t, slice(n + T + t * m, n + T + (t + 1) * m)
        allowed[row, :n] = allowed[row, row] = allowed[row, memory] = True
        allowed[memory, memory] = True  # memory rows are dropped; any non-empty row keeps softmax finite
    for layer, block in enumerate(model.blocks):
        memories = torch.cat([task.memory[layer] for task in tasks], dim=0).expand(B, -1, -1) if tasks else None
        sequence = torch.cat([h, cls] + ([memories] if memories is not None else []), dim=1)
        sequence = block(sequence, allowed)
        h, cls = sequence[:, :n], sequence[:, n:n + T]
    return (model.head(model.ln_f(h[:, 0])),
            [task.head(model.ln_f(cls[:, t])) for t, task in enumerate(tasks)])


class MemoryViT(nn.Module):
    """A backbone ViT with memory tokens and a new head: the model memory fine-tuning trains (and the inner loop
    of :class:`metaopt.learners.MemoryTokens` adapts). ``forward(x [B, C, H, W]) -> logits [B, num_classes]``.

    Args:
        backbone: the (pretrained) ViT; its own head is not used.
        memory_tokens: m tokens per layer (0: head-only fine-tuning on the frozen features).
        num_classes: the new head's outputs.
    """

    def __init__(self, backbone: ViT, memory_tokens: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.memory = nn.Parameter(init_memory(backbone.n_layer, memory_tokens, backbone.n_embd))
        self.new_head = nn.Linear(backbone.n_embd, positive_int("num_classes", num_classes, owner="MemoryViT"))

    def forward(self, x: Tensor) -> Tensor:
        memory = self.memory if self.memory.shape[-2] else None
        return self.new_head(self.backbone.features(x, memory))


def parameter_count(module: nn.Module, names: Sequence[str] | None = None) -> int:
    """How many numbers ``module`` trains: those of the parameters whose names start with one of ``names``
    (all of them with ``None``)."""
    return sum(p.numel() for n, p in module.named_parameters()
               if names is None or any(n == a or n.startswith(a + ".") for a in names))


__all__ = ["ExplicitSoftmaxAttention", "ViT", "TaskTokens", "MemoryViT", "init_memory", "masked_reference", "parameter_count",
           "MEMORY_INIT_STD"]
