"""One meta-training step of the quickstart transformer against the reference a user would pick for it.

The reference is Garg et al.'s model (dtsip/in-context-learning, ``src/models.py``: ``TransformerModel``), what
a user reproducing "What can transformers learn in context?" runs: a linear read-in, Hugging Face's
``GPT2Model`` called on ``inputs_embeds`` (its own learned positions, its own causal attention), a linear
read-out, predictions read at the input tokens; its ``GPT2Config`` as Garg et al. set it (no dropout, no cache,
GPT-2's tanh-approximated GELU), at the quickstart's width, depth and heads. Its step is Garg et al.'s
``train_step``: zero the gradients, forward, squared error, backward, ``torch.optim.Adam``, read the loss.

Ours is a step of ``MetaTrainer`` on ``recipes/quickstart.yaml``'s transformer as ``metaopt run quickstart``
takes it (AdamW, gradient clipping, the learning-rate schedule), minus the episode sampling: both sides step on
the same batch of 256 tasks (11 support examples, 1 query) and read the same 23 tokens per task, ours in their
interleaved form ``[x, 0], [0, y], …, [x_q, 0]``. Garg et al. put y in the first slot of a d-wide token and
append a 24th token (the last label, which no prediction sees); the reference here reads our tokens instead,
so that the two models are the same function: one read-in column wider, one token shorter (1/24 of the work).
``ours_plain_step_s`` is our learner under the reference's step (Adam, no clipping): what the model alone costs.

Checked first, in float64: with our weights copied into it and GPT-2's exact GELU (the one architectural
difference: our blocks use the exact GELU, Garg et al.'s configuration the tanh approximation), the reference's
loss and every parameter's gradient equal ours to 1e-10. Timed in float32, the best of a few steps after a
warm-up, with each side's achieved GFLOP/s (``benchmarks.flops``). The target is ours at least 1.5× faster.
Skipped, with a message, when ``transformers`` (the ``bench`` extra, which ``make bench`` installs) is missing.
"""

from __future__ import annotations

import copy
import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_maml import float64
from benchmarks.flops import achieved, count_flops
from benchmarks.timing import best_of
from benchmarks.trainers import always, recipe_trainer
from metaopt.episodes import Episode
from metaopt.extras import import_transformers
from metaopt.learners import Transformer
from metaopt.learners.incontext.tokens import context_tokens, episode_arrays, query_tokens
from metaopt.pipelines import load
from metaopt.pipelines.episodes import train_settings

RECIPE, LEARNER = "quickstart", "transformer"
TOLERANCE = 1e-10
TARGET_SPEEDUP = 1.5
CHECK_TASKS = 8


class GargTransformer(nn.Module):
    """Garg et al.'s in-context regression model: read-in, ``GPT2Model`` on embeddings, read-out.

    Args:
        token_dim: width of the tokens read in.
        n_positions: the longest sequence (GPT-2's position table).
        n_embd, n_layer, n_head: GPT-2's size.
        activation: GPT-2's activation (``"gelu_new"``, its default and Garg et al.'s; ``"gelu"`` is exact).
    """

    def __init__(self, token_dim: int, n_positions: int, n_embd: int, n_layer: int, n_head: int, *,
                 activation: str = "gelu_new") -> None:
        super().__init__()
        transformers = import_transformers()
        config = transformers.GPT2Config(n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                         activation_function=activation)
        self.read_in = nn.Linear(token_dim, n_embd)
        self.backbone = transformers.GPT2Model(config)
        self.read_out = nn.Linear(n_embd, 1)

    @classmethod
    def like(cls, ours: Transformer, *, activation: str = "gelu_new") -> "GargTransformer":
        """The reference of the same size as ``ours``, in its dtype and on its device."""
        first = ours.blocks[0]
        n_embd = ours.read_in.out_features
        reference = cls(ours.read_in.in_features, ours.pos_emb.num_embeddings, n_embd, len(ours.blocks),
                        first.attn.n_head, activation=activation)
        return reference.to(ours.read_in.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Predictions ``[T, ceil(L / 2)]`` at the input tokens (every other one, from the first) of ``[T, L, E]``."""
        hidden = self.backbone(inputs_embeds=self.read_in(tokens)).last_hidden_state
        return self.read_out(hidden)[:, ::2, 0]


def episode_tokens(episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens ``[T, 2S + 1, x + 1]`` our transformer reads for an episode with one query, and the labels
    ``[T, S + 1]`` it predicts at the input tokens."""
    if episode.num_query != 1:
        raise ValueError(f"episode_tokens: one causal sequence holds one query; got num_query={episode.num_query}")
    xs, ys, xq = episode_arrays("GargTransformer", episode, episode.x_shape[0], 1)
    tokens = torch.cat([context_tokens(xs, ys, "interleaved"), query_tokens(xq, 1)], dim=1)
    return tokens, torch.cat([ys, episode.y_query.flatten(2).to(ys.dtype)], dim=1)[..., 0]


def reference_loss(reference: GargTransformer, episode: Episode) -> torch.Tensor:
    """The reference's squared error on every input token of the episode's sequence (Garg et al.'s loss)."""
    tokens, targets = episode_tokens(episode)
    return F.mse_loss(reference(tokens), targets)


def _pairs(ours: Transformer, reference: GargTransformer) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(our parameter, the reference's, whether it is transposed there): GPT-2's ``Conv1D`` stores ``[in, out]``."""
    gpt = reference.backbone
    modules = [(ours.read_in, reference.read_in, False), (ours.ln_f, gpt.ln_f, False),
               (ours.read_out, reference.read_out, False)]
    for block, theirs in zip(ours.blocks, gpt.h, strict=True):
        modules += [(block.ln_1, theirs.ln_1, False), (block.attn.qkv, theirs.attn.c_attn, True),
                    (block.attn.proj, theirs.attn.c_proj, True), (block.ln_2, theirs.ln_2, False),
                    (block.mlp[0], theirs.mlp.c_fc, True), (block.mlp[2], theirs.mlp.c_proj, True)]
    yield ours.pos_emb.weight, gpt.wpe.weight, False
    for mine, theirs, transposed in modules:
        yield mine.weight, theirs.weight, transposed
        yield mine.bias, theirs.bias, False


def copy_weights(ours: Transformer, reference: GargTransformer) -> None:
    """Give ``reference`` our weights, so that both compute the same function."""
    with torch.no_grad():
        for mine, theirs, transposed in _pairs(ours, reference):
            theirs.copy_(mine.T if transposed else mine)


def check_same_function(ours: Transformer, episode: Episode, *, tolerance: float = TOLERANCE) -> float:
    """In float64, the reference with our weights and the exact GELU has our loss and gradients on ``episode``;
    returns the loss (AssertionError past ``tolerance``)."""
    ours64, episode64 = copy.deepcopy(ours).double(), float64(episode)
    reference = GargTransformer.like(ours64, activation="gelu")
    copy_weights(ours64, reference)
    ours_loss, theirs_loss = ours64.loss(episode64), reference_loss(reference, episode64)
    torch.testing.assert_close(theirs_loss, ours_loss, rtol=tolerance, atol=tolerance)
    (ours_loss + theirs_loss).backward()
    for mine, theirs, transposed in _pairs(ours64, reference):
        torch.testing.assert_close(theirs.grad.T if transposed else theirs.grad, mine.grad, rtol=tolerance,
                                   atol=tolerance)
    return float(ours_loss.detach())


def garg_step(loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """Garg et al.'s ``train_step``: zero the gradients, the loss, backward, step, read the loss."""
    optimizer.zero_grad()
    value = loss()
    value.backward()
    optimizer.step()
    return value.detach().item()


def _timed(step: Callable[[], object], repeats: int, device: torch.device) -> dict:
    seconds = best_of(step, repeats=repeats, warmup=2)
    return {"step_s": seconds, **achieved(count_flops(step), seconds, device=device)}


def run(*, device: str = "cpu", quick: bool = False) -> dict:
    """Check (float64, a few tasks), then time one step of each side on the recipe's batch (``quick``: 16 tasks)."""
    try:
        import_transformers()
    except ImportError as error:
        print(f"bench_transformer skipped: {error}", file=sys.stderr)
        return {"skipped": str(error)}
    settings = train_settings(load(RECIPE), LEARNER)
    batch = 16 if quick else settings.batch_size
    where = torch.device(device)
    trainer = recipe_trainer(RECIPE, LEARNER, batch, 10**6, where)
    episode = trainer.family.sample(batch, settings.support, settings.query,
                                    generator=torch.Generator().manual_seed(0)).to(where)
    ours = always(trainer, episode).learner
    loss = check_same_function(ours, episode.select_tasks(slice(0, CHECK_TASKS)))
    reference = GargTransformer.like(ours)
    ours_adam = torch.optim.Adam(ours.parameters(), lr=settings.lr)
    reference_adam = torch.optim.Adam(reference.parameters(), lr=settings.lr)
    repeats = 3 if quick else 10
    timed = {
        "ours_trainer_step": _timed(trainer._train_step, repeats, where),
        "ours_plain_step": _timed(lambda: garg_step(lambda: ours.loss(episode), ours_adam), repeats, where),
        "reference_gpt2_step": _timed(lambda: garg_step(lambda: reference_loss(reference, episode), reference_adam),
                                      repeats, where),
    }
    return {
        "recipe": RECIPE, "learner": LEARNER, "tasks": batch, "tokens_per_task": 2 * settings.support + 1,
        "parameters": sum(p.numel() for p in ours.parameters()),
        "reference_parameters_trained": sum(p.numel() for n, p in reference.named_parameters()
                                            if not n.startswith("backbone.wte")),
        "check": {"same_loss_and_gradients_in_float64_to": TOLERANCE, "tasks": CHECK_TASKS, "loss": loss},
        **timed,
        "speedup": timed["reference_gpt2_step"]["step_s"] / timed["ours_trainer_step"]["step_s"],
        "speedup_plain_step": timed["reference_gpt2_step"]["step_s"] / timed["ours_plain_step"]["step_s"],
        "target_speedup": TARGET_SPEEDUP,
    }
