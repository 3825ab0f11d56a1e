"""A small causal language model built from the project's transformer blocks, and its cached pretraining.

GPT-2 in miniature (nanoGPT's layout): token and learned position embeddings, a stack of pre-norm
:class:`metaopt.learners.attention.Block` with a causal mask, a final norm and a linear read-out tied to the token
embedding. :func:`pretrain` trains it with Adam (through ``as_torch_optimizer``) on a token corpus and caches the
weights under a name made from everything that determines them, so the experiments that start from the
pretrained model train it once (``checkpoints.save``: atomic; loaded with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import optimizers as O
from metaopt import checkpoints, distributed
from metaopt.checks import positive_float, positive_int
from metaopt.learners.attention import Block
from metaopt.progress import Progress

__all__ = ["CausalLM", "next_token_log_probs", "pretrain"]

logger = logging.getLogger(__name__)


class CausalLM(nn.Module):
    """A decoder-only transformer over token ids ``[B, L]`` that returns next-token logits ``[B, L, vocab]``."""

    def __init__(self, vocab: int, *, max_len: int = 64, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("vocab", vocab), ("max_len", max_len), ("n_embd", n_embd), ("n_layer", n_layer),
                            ("n_head", n_head)):
            positive_int(name, value, owner="CausalLM")
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab, n_embd)
        self.positions = nn.Embedding(max_len, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        nn.init.normal_(self.tokens.weight, std=0.02)  # as in GPT-2
        nn.init.normal_(self.positions.weight, std=0.02)

    def hidden(self, ids: Tensor) -> Tensor:
        """The final hidden states ``[B, L, C]`` of token ids ``[B, L]``."""
        h = self.tokens(ids)
        L = h.shape[1]
        if L > self.max_len:
            raise ValueError(f"CausalLM: sequence of {L} tokens; max_len is {self.max_len}")
        h = h + self.positions(torch.arange(L, device=h.device))
        mask = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()  # causal: a token sees its past
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(h)

    def forward(self, ids: Tensor) -> Tensor:
        return self.hidden(ids) @ self.tokens.weight.T  # read-out tied to the embedding


def next_token_log_probs(model: CausalLM, prefixes: Tensor) -> Tensor:
    """``log p(· | prefix)`` ``[B, vocab]`` for prefixes ``[B, L]`` (all of one length)."""
    return F.log_softmax(model(prefixes)[:, -1], dim=-1)


def _cache_name(settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return f"lm_{digest}.pt"


def pretrain(model: CausalLM, corpus: Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
             cache_dir: str | Path | None, identity: dict[str, Any], progress: bool = True) -> tuple[CausalLM, bool]:
    """Train ``model`` on ``corpus`` ``[N, L]`` (next-token cross-entropy, Adam with a cosine decay), or load it.

    ``identity`` says what else determines the weights (the corpus's and the model's settings): with the training
    settings it names the cache file in ``cache_dir`` (None: no cache). ``progress`` shows the training's progress
    (on rank 0 only) with its latest loss. Returns the model and whether it was loaded.
    """
    positive_int("steps", steps, owner="pretrain")
    positive_int("batch_size", batch_size, owner="pretrain")
    positive_float("lr", lr, owner="pretrain")
    name = _cache_name({**identity, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed})
    path = None if cache_dir is None else Path(cache_dir) / name
    if path is not None and path.is_file():
        model.load_state_dict(checkpoints.load(path))
        logger.info("pretrained language model loaded from %s", path)
        return model, True
    optimizer = O.as_torch_optimizer(O.adam(lr), model.named_parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    latest: dict[str, str] = {}  # the loss, read every 200 steps (reading it waits for the device)
    with Progress(steps, "pretrain the language model", enabled=progress and distributed.is_main(),
                  unit="step") as bar:
        for step in range(steps):
            batch = corpus[torch.randint(len(corpus), (batch_size,), generator=g)]
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % 200 == 0 or step == steps - 1:
                latest = {"loss": f"{loss.item():.4f}"}
            bar.update(1, **latest)
    logger.info("pretrained the language model: %d steps, final loss %s", steps, latest["loss"])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.save(model.state_dict(), path)
    return model, False
