"""A specialized optimizer for a small character-level transformer LM on a corpus made on the fly (no download).

    python examples/char_transformer.py            # meta-trains, compares with tuned Adam (constant, cosine), plots
    python examples/char_transformer.py --quick    # seconds

The corpus is sentences drawn from a small grammar; the model reads 32 characters and predicts each next one.
Writes runs/examples/char_transformer/{mixture.pt, loss_curves.png, results.json}.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _compare import Problem, arguments, compare, report

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "her sister", "a small bird", "the teacher"]
VERBS = ["sees", "likes", "finds", "follows", "draws", "calls", "helps"]
OBJECTS = ["the ball", "a red box", "the river", "his hat", "a green tree", "the moon", "our house"]
ENDINGS = [".", " today.", " again.", " at night.", " in the rain."]


def corpus(characters: int, seed: int = 0) -> str:
    """Sentences ``subject verb object ending`` drawn uniformly, until ``characters`` long."""
    rng, text = random.Random(seed), []
    while sum(map(len, text)) < characters:
        text.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)} ")
    return "".join(text)[:characters]


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, as in GPT-2."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).transpose(1, 3).unbind(2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [batch, heads, length, width/heads]
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab: int, context: int, width: int = 32, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tokens(ids) + self.positions[: ids.shape[1]]
        return self.head(self.norm(self.blocks(x)))  # [batch, length, vocab]


def next_character_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main(argv: Sequence[str] | None = None) -> dict:
    args = arguments(__doc__.splitlines()[0], argv)
    context = 32
    text = corpus(2_000 if args.quick else 40_000)
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    starts = torch.randperm(len(ids) - context - 1, generator=torch.Generator().manual_seed(0))
    windows = ids[starts[:, None] + torch.arange(context + 1)]  # [examples, context + 1]
    x, y = windows[:, :-1], windows[:, 1:]

    def make_model() -> nn.Module:
        return CharLM(len(vocab), context, depth=1 if args.quick else 2)

    if args.quick:
        problem = Problem("char_transformer", make_model, x[:256], y[:256], next_character_loss, horizon=4,
                          batch_size=16, eval_examples=32)
        results = compare(problem, args, meta_steps=1, pairs=1, eval_seeds=1, grid=(3e-3, 1e-2))
    else:
        problem = Problem("char_transformer", make_model, x, y, next_character_loss, horizon=60, batch_size=32,
                          eval_examples=256)
        # one inner run at a time: on CPU, vmap has no batching rule for fused attention (2x slower batched)
        results = compare(problem, args, meta_steps=40, pairs=4, eval_seeds=3, batch_runs=1)
    print(report(results))
    return results


if __name__ == "__main__":
    main()
