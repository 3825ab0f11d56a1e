"""Dai et al.'s dual form: in-context learning as implicit finetuning of the keys and values.

Dai et al. (ACL 2023 Findings, "Why Can GPT Learn In-Context? Language Models Secretly Perform
Gradient Descent as Meta-Optimizers", Sec. 3) write linear attention of a query q = W_Q x over the
query's own tokens X and the demonstration tokens X' as

    W_V [X'; X] (W_K [X'; X])ᵀ q = W_0 q + ΔW q,   W_0 = Σ_{j ∈ X} (W_V t_j)(W_K t_j)ᵀ,
                                                   ΔW = Σ_{i ∈ X'} (W_V x'_i)(W_K x'_i)ᵀ,

so the demonstrations act as an update ΔW of a linear layer (``dual_form_linear_attention`` computes
both sides). They then compare in-context learning (ICL) with finetuning (FT) of only W_K and W_V.

Our transfer to metaopt's causal ``Transformer`` (interleaved tokens, one token per x or y):

- Prompt layout. The support set of each task is split into ``demonstrations`` (its first n examples)
  and ``shared`` examples (the next m), which play the role of the tokens of Dai et al.'s query
  sentence: every setting sees them. Zero-shot (ZS): the model reads the m shared examples and the
  query. ICL: it reads the n demonstrations, the m shared examples and the query. FT: the finetuned
  model reads what ZS reads. With m = 0 the query would attend to itself only, and W_K (hence SimAM)
  would play no role, so m ≥ 1 is the default.
- Finetuning. One pass over the demonstrations in order, batch 1: for i = 1..n one SGD step with
  step size ``lr`` on the loss of predicting y_i from x_i put in the query slot of the same template
  (the shared examples as context), updating only the key and value rows (weight and bias) of every
  block's ``attn.qkv``. Each task is finetuned from the same weights on its own demonstrations; the
  tasks are vectorised with ``torch.func.vmap`` over ``torch.func.grad``.
- SimAOU (per layer): the cosine between the attention-output updates ``h_ICL − h_ZS`` and
  ``h_FT − h_ZS`` at the query token (the block's attention output after its projection), mean over
  tasks and queries. Control: the cosine between ``h_ICL − h_ZS`` and a random N(0, I) update.
- SimAM (per layer): the cosine between the query's pre-softmax attention scores (all heads) over the
  tokens every setting sees (the 2m shared tokens and itself), ICL vs FT. Control: ICL vs ZS.
- Rec2FTP: the share of the queries FT fixes that ICL fixes too. A query is *fixed* by a setting if it
  is right there and wrong zero-shot. Binary episodes: right = the sign of the logit matches the label.
  Regression: right = squared error below a threshold τ; by default τ is the median zero-shot squared
  error over the queries analysed (so half the queries start wrong), or the ``threshold`` given.
- Every score is also reported for an **untrained** copy of the model (re-initialised weights, same
  architecture), the control later work showed matters: similar scores there mean the metric does not
  measure learning.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metaopt.analysis.sensitivity import quiet_batching_fallback
from metaopt.episodes import Episode
from metaopt.kinds import EpisodeKind
from metaopt.learners.attention import SoftmaxAttention
from metaopt.learners.capabilities import Capability, provides
from metaopt.learners.transformer import Transformer


# ---------------------------------------------------------------------- the dual-form identity
@dataclass
class DualForm:
    """Both sides of the dual form for linear attention (see the module doc); ``[..., d_v]`` vectors.

    ``attention`` is Σ_j (W_V t_j)(W_K t_j)·q over all tokens, computed as attention; ``zero_shot`` is
    ``W_0 q`` and ``update`` is ``ΔW q``, so ``attention == zero_shot + update``. ``delta_w`` is ΔW
    ``[..., d_v, d_k]`` and ``w0`` is W_0.
    """

    attention: torch.Tensor
    zero_shot: torch.Tensor
    update: torch.Tensor
    w0: torch.Tensor
    delta_w: torch.Tensor


def dual_form_linear_attention(
    w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, demonstrations: torch.Tensor, shared: torch.Tensor,
    x: torch.Tensor,
) -> DualForm:
    """Linear attention of ``x`` over ``[demonstrations; shared]`` and its dual form ``W_0 q + ΔW q``.

    Args:
        w_q, w_k: ``[d_k, C]``; w_v: ``[d_v, C]``.
        demonstrations: ``[..., n, C]`` tokens x'_i; shared: ``[..., m, C]`` tokens t_j.
        x: the query token ``[..., C]``.
    """
    q = x @ w_q.T  # [..., d_k]
    tokens = torch.cat([demonstrations, shared], dim=-2)
    scores = (tokens @ w_k.T) @ q[..., None]  # [..., n + m, 1]: linear attention, no softmax
    attention = ((tokens @ w_v.T) * scores).sum(-2)

    def outer_sum(t: torch.Tensor) -> torch.Tensor:  # Σ_i (W_V t_i)(W_K t_i)ᵀ
        return (t @ w_v.T).transpose(-1, -2) @ (t @ w_k.T)

    w0, delta_w = outer_sum(shared), outer_sum(demonstrations)
    return DualForm(attention, (w0 @ q[..., None])[..., 0], (delta_w @ q[..., None])[..., 0], w0, delta_w)


# ---------------------------------------------------------------------- finetuning W_K, W_V
def _attentions(model: Transformer) -> list[nn.Module]:
    """Each block's attention, refusing blocks whose attention is not softmax (or momentum) attention."""
    if not provides(model, Capability.ATTENTION_DUAL_FORM):
        raise ValueError(f"the dual-form analysis needs a learner with {Capability.ATTENTION_DUAL_FORM.description} "
                         f"(capability 'attention_dual_form', e.g. metaopt.learners.Transformer); got "
                         f"{type(model).__name__}")
    attentions = [block.attn for block in model.blocks]
    if not all(isinstance(a, SoftmaxAttention) for a in attentions):
        raise ValueError("the dual-form analysis needs softmax (or momentum) attention in every block; got "
                         f"{[type(a).__name__ for a in attentions]}")
    return attentions


def key_value_parameters(model: Transformer) -> dict[str, torch.Tensor]:
    """The key and value rows of every block's ``attn.qkv``.

    Returns ``{"blocks.i.attn.qkv.weight": [2C, C], "blocks.i.attn.qkv.bias": [2C], ...}`` (detached).
    """
    _attentions(model)
    return {name: p.detach()[p.shape[0] // 3:] for name, p in model.named_parameters() if ".attn.qkv." in name}


def _full_parameters(model: Transformer, key_value: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``attn.qkv`` weights and biases with the query rows of ``model`` and the given key/value rows."""
    own = dict(model.named_parameters())
    return {name: torch.cat([own[name].detach()[: own[name].shape[0] // 3], kv]) for name, kv in key_value.items()}


def _single(xs, ys, xq, yq, kind: EpisodeKind) -> Episode:
    """A one-task episode from per-task tensors (inside ``vmap``, where the task dimension is hidden)."""
    return Episode(xs[None], ys[None], xq[None], yq[None], kind=kind)


@dataclass
class Prompts:
    """The three inputs of Dai et al.'s comparison, as episodes over the same tasks and queries."""

    icl: Episode  # demonstrations + shared examples as support
    zero_shot: Episode  # shared examples only
    demonstrations: Episode  # the demonstrations, one query each: x_i with label y_i ([T, n, ...])


def split_prompts(episode: Episode, demonstrations: int, shared: int) -> Prompts:
    """Split each task's support into ``demonstrations`` then ``shared`` examples (see the module doc).

    Raises:
        ValueError: unless ``demonstrations >= 1``, ``shared >= 0`` and their sum fits the support set.
    """
    n, m = demonstrations, shared
    if n < 1 or m < 0 or n + m > episode.num_support:
        raise ValueError(f"dual form: need demonstrations >= 1 and shared >= 0 with demonstrations + shared <= "
                         f"{episode.num_support} (the support size); got demonstrations={n!r}, shared={m!r}")
    xs, ys = episode.x_support, episode.y_support
    zero_shot = episode.replace(x_support=xs[:, n:n + m], y_support=ys[:, n:n + m])
    return Prompts(
        icl=episode.take_support(n + m),
        zero_shot=zero_shot,
        demonstrations=zero_shot.replace(x_query=xs[:, :n], y_query=ys[:, :n]),
    )


def finetune_keys_values(model: Transformer, prompts: Prompts, lr: float) -> dict[str, torch.Tensor]:
    """Per-task key/value rows ``{name: [T, ...]}`` after one pass of batch-1 SGD over the demonstrations.

    Step i updates only the key/value rows (see ``key_value_parameters``) by ``−lr ∇ loss(ŷ(x_i), y_i)``,
    where ŷ(x_i) is the model's prediction for x_i in the zero-shot template (the shared examples as
    context); every other weight keeps its value. The model itself is not modified.
    """
    kind = prompts.zero_shot.kind
    shared_x, shared_y = prompts.zero_shot.x_support, prompts.zero_shot.y_support
    demo_x, demo_y = prompts.demonstrations.x_query, prompts.demonstrations.y_query

    def loss(key_value, xs, ys, xq, yq):
        episode = _single(xs, ys, xq, yq, kind)
        return kind.loss(functional_call(model, _full_parameters(model, key_value), (episode,)), episode.y_query)

    step = vmap(grad(loss))
    num_tasks = shared_x.shape[0]
    key_value = {name: p.expand(num_tasks, *p.shape).clone() for name, p in key_value_parameters(model).items()}
    for i in range(demo_x.shape[1]):  # one pass, in order, batch 1
        with quiet_batching_fallback():
            grads = step(key_value, shared_x, shared_y, demo_x[:, i:i + 1], demo_y[:, i:i + 1])
        key_value = {name: p - lr * grads[name] for name, p in key_value.items()}
    return key_value


# ---------------------------------------------------------------------- tracing attention at the query
@dataclass
class Trace:
    """What a model computes at the query tokens: ``[T, Q, ...]`` per field.

    ``outputs`` ``[L, T, Q, C]``: each block's attention output (after its projection);
    ``scores`` ``[L, T, Q, H, 2m + 1]``: pre-softmax scores over the last 2m support tokens and itself;
    ``predictions`` ``[T, Q, y]``.
    """

    outputs: torch.Tensor
    scores: torch.Tensor
    predictions: torch.Tensor


def _traced(model: Transformer, shared_tokens: int) -> Callable[[Episode, dict], tuple]:
    """A function ``(episode, parameters) -> (outputs, scores, predictions)`` that records every block.

    The queries are the last ``Q`` tokens (``Transformer`` puts them after the support, one support
    size); the hooks store tensors in a list that the function empties, so it works under ``vmap``.
    """
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        h = args[0]
        B, L, C = h.shape
        q, k, _ = module.qkv(h).split(C, dim=2)
        heads = module.n_head
        q, k = (t.view(B, L, heads, C // heads).transpose(1, 2) for t in (q, k))  # [B, H, L, C / H]
        records.append((output, q @ k.transpose(-1, -2) / math.sqrt(C // heads)))  # scores [B, H, L, L]

    def run(episode: Episode, parameters: dict[str, torch.Tensor]) -> tuple:
        records.clear()
        handles = [attn.register_forward_hook(hook) for attn in _attentions(model)]
        try:
            predictions = functional_call(model, parameters, (episode,))
        finally:
            for handle in handles:
                handle.remove()
        support_end = 2 * episode.num_support
        visible = list(range(support_end - shared_tokens, support_end))
        outputs = torch.stack([out[:, support_end:] for out, _ in records])  # [L, B, Q, C]
        scores = torch.stack([
            torch.cat([s[:, :, support_end:, visible], s[:, :, support_end:, support_end:].diagonal(dim1=-2, dim2=-1)[
                ..., None]], dim=-1)
            for _, s in records
        ]).transpose(2, 3)  # [L, B, Q, H, 2m + 1]
        records.clear()
        return outputs, scores, predictions

    return run


def trace(model: Transformer, episode: Episode, shared: int, key_value: dict[str, torch.Tensor] | None = None) -> Trace:
    """Attention outputs and scores at the queries, with per-task key/value rows ``[T, ...]`` if given."""
    run = _traced(model, 2 * shared)
    with torch.no_grad(), quiet_batching_fallback():
        if key_value is None:
            outputs, scores, predictions = run(episode, {})
        else:
            def one(kv, xs, ys, xq, yq):
                out, sc, pred = run(_single(xs, ys, xq, yq, episode.kind), _full_parameters(model, kv))
                return out[:, 0], sc[:, 0], pred[0]

            outputs, scores, predictions = vmap(one, out_dims=(1, 1, 0))(
                key_value, episode.x_support, episode.y_support, episode.x_query, episode.y_query)
    return Trace(outputs, scores, predictions)


# ---------------------------------------------------------------------- SimAOU, SimAM, Rec2FTP
@dataclass
class DualFormScores:
    """Dai et al.'s scores for one model (see the module doc); per-layer lists have one value per block.

    ``ft_fixed`` counts the queries FT fixes (Rec2FTP's denominator; Rec2FTP is None when it is 0);
    ``threshold`` is τ for regression (None for binary); ``loss_*`` are the mean task losses on the
    queries zero-shot, in context and after finetuning. ``*_mean`` are the per-layer lists' means over
    the layers (Dai et al.'s summary numbers; a recipe claim addresses them as, e.g.,
    ``dual_form/transformer/trained/sim_aou_mean``).
    """

    sim_aou: list[float]
    sim_aou_random: list[float]
    sim_am: list[float]
    sim_am_zero_shot: list[float]
    rec2ftp: float | None
    ft_fixed: int
    threshold: float | None
    loss_zero_shot: float
    loss_icl: float
    loss_ft: float
    sim_aou_mean: float = field(init=False)
    sim_aou_random_mean: float = field(init=False)
    sim_am_mean: float = field(init=False)
    sim_am_zero_shot_mean: float = field(init=False)

    def __post_init__(self) -> None:
        for name in ("sim_aou", "sim_aou_random", "sim_am", "sim_am_zero_shot"):
            values = getattr(self, name)
            setattr(self, f"{name}_mean", sum(values) / len(values))


@dataclass
class DualFormReport:
    """``icl_vs_finetuning``'s result: the scores of the trained model and of its untrained copy."""

    num_tasks: int
    demonstrations: int
    shared: int
    lr: float
    trained: DualFormScores
    untrained: DualFormScores


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Cosine over the last dimension, averaged over all but the first (layer) dimension."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12).flatten(1).mean(1).tolist()


def dual_form_scores(
    model: Transformer, episode: Episode, *, demonstrations: int, shared: int = 1, lr: float = 0.1,
    threshold: float | None = None, generator: torch.Generator | None = None,
) -> DualFormScores:
    """SimAOU, SimAM and Rec2FTP of ``model`` on ``episode`` (every query of every task; see the module doc)."""
    model.check_episode(episode)
    prompts = split_prompts(episode, demonstrations, shared)
    was_training = model.training
    model.eval()
    try:
        zero_shot = trace(model, prompts.zero_shot, shared)
        icl = trace(model, prompts.icl, shared)
        ft = trace(model, prompts.zero_shot, shared, finetune_keys_values(model, prompts, lr))
    finally:
        model.train(was_training)
    icl_update = icl.outputs - zero_shot.outputs
    random_update = torch.randn(icl_update.shape, generator=generator, dtype=icl_update.dtype).to(icl_update.device)
    if not episode.kind.discrete and threshold is None:
        threshold = (zero_shot.predictions - episode.y_query).pow(2).flatten(2).mean(-1).median().item()
    settings = (("zs", zero_shot), ("icl", icl), ("ft", ft))
    right = {name: episode.kind.correct(t.predictions, episode.y_query, tolerance=threshold) for name, t in settings}
    ft_fixes = right["ft"] & ~right["zs"]
    fixed = int(ft_fixes.sum())
    return DualFormScores(
        sim_aou=_mean_cosine(icl_update, ft.outputs - zero_shot.outputs),
        sim_aou_random=_mean_cosine(icl_update, random_update),
        sim_am=_mean_cosine(icl.scores.flatten(3), ft.scores.flatten(3)),
        sim_am_zero_shot=_mean_cosine(icl.scores.flatten(3), zero_shot.scores.flatten(3)),
        rec2ftp=(right["icl"] & ft_fixes).sum().item() / fixed if fixed else None,
        ft_fixed=fixed,
        threshold=None if episode.kind.discrete else float(threshold),
        loss_zero_shot=episode.kind.loss(zero_shot.predictions, episode.y_query).item(),
        loss_icl=episode.kind.loss(icl.predictions, episode.y_query).item(),
        loss_ft=episode.kind.loss(ft.predictions, episode.y_query).item(),
    )


def untrained_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every weight re-initialised (same architecture), from a seeded RNG.

    Each submodule's ``reset_parameters`` runs, then the model's own ``_init_weights`` where it has one
    (the GPT-2 initialisation of ``Transformer``); the caller's RNG state is left as it was.
    """
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if module is not fresh and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if hasattr(fresh, "_init_weights"):
            fresh.apply(fresh._init_weights)
    return fresh


def icl_vs_finetuning(
    model: Transformer, episode: Episode, *, demonstrations: int | None = None, shared: int = 1, lr: float = 0.1,
    threshold: float | None = None, seed: int = 0,
) -> DualFormReport:
    """Dai et al.'s ICL-vs-finetuning comparison for ``model`` and for its untrained copy, on the same tasks.

    ``demonstrations`` defaults to every support example but the ``shared`` ones. Both models are
    scored with the same τ (the trained model's, unless ``threshold`` is given) and random controls
    from a generator seeded with ``seed``.
    """
    n = episode.num_support - shared if demonstrations is None else int(demonstrations)
    trained = dual_form_scores(model, episode, demonstrations=n, shared=shared, lr=lr, threshold=threshold,
                               generator=torch.Generator().manual_seed(seed))
    untrained = dual_form_scores(untrained_copy(model, seed), episode, demonstrations=n, shared=shared, lr=lr,
                                 threshold=trained.threshold, generator=torch.Generator().manual_seed(seed))
    return DualFormReport(episode.num_tasks, n, shared, float(lr), trained, untrained)
