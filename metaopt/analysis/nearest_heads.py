"""Which attention heads look at the nearest earlier example (Bhattamishra et al. 2024, section 5)?

On nearest-neighbour tasks the paper finds an induction-like head in the frozen pretrained transformer: at the
input x_j, it attends to the earlier example whose input is the most similar to x_j. For every softmax-attention
head of a learner over interleaved tokens (``x_1, y_1, x_2, y_2, …``), :func:`nearest_example_mass` measures the
attention that each x_j token (j ≥ 1) puts on the tokens (x_i and y_i) of its nearest earlier examples (lowest
Hamming distance, every tie counted), beside chance: what uniform attention over the visible tokens would put there.

The attention is fused (``scaled_dot_product_attention``), so :func:`attention_maps` recomputes the weights from
each head's queries and keys, captured at every ``SoftmaxAttention`` module's input. :func:`nearest_example_heads`
is an ``evaluate:`` hook: it scores the heads of every learner that has them on the family's episodes and plots
the scores.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from metaopt import plotting
from metaopt.checks import positive_float, positive_int
from metaopt.learners.attention import SoftmaxAttention
from metaopt.learners.base import Learner
from metaopt.log import Run
from metaopt.seeds import SeedPlan
from metaopt.tasks.base import TaskFamily

__all__ = ["attention_maps", "nearest_example_heads", "nearest_example_mass", "nearest_examples"]

logger = logging.getLogger(__name__)


def nearest_examples(x: Tensor) -> Tensor:
    """``[T, S, S]`` bool: example i < j is among the nearest (Hamming) earlier examples of example j."""
    distance = torch.cdist(x.float(), x.float(), p=1)  # [T, S, S]
    S = x.shape[1]
    earlier = torch.ones(S, S, dtype=torch.bool, device=x.device).tril(-1)
    distance = distance.masked_fill(~earlier, float("inf"))
    best = distance.min(-1, keepdim=True).values
    return earlier & (distance == best)


def nearest_example_mass(attention: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean attention mass per head ``[H]`` from each x_j token (j ≥ 1) on its nearest examples' tokens, and chance.

    ``attention`` is ``[T, H, L, L]`` over interleaved tokens (x_j at 2j, y_j at 2j + 1; ``L >= 2S - 1``) and
    ``x`` the support inputs ``[T, S, n]``. Chance is the mass uniform attention over the ``2j + 1`` visible tokens
    would give the nearest examples' ``2 · ties`` tokens.
    """
    T, S, _ = x.shape
    if S < 2:
        raise ValueError(f"nearest_example_mass: needs at least 2 support examples; got {S}")
    nearest = nearest_examples(x)[:, 1:]  # [T, S - 1, S], rows j = 1..S-1
    rows = attention[:, :, 2 : 2 * S : 2, : 2 * S]  # from x_j, j = 1..S-1: [T, H, S - 1, 2S]
    on_example = rows.unflatten(-1, (S, 2)).sum(-1)  # x_i and y_i together: [T, H, S - 1, S]
    mass = (on_example * nearest[:, None]).sum(-1)  # [T, H, S - 1]
    visible = 2 * torch.arange(1, S, device=x.device) + 1
    chance = 2 * nearest.sum(-1) / visible  # [T, S - 1]
    return mass.mean((0, 2)), chance.mean()


def attention_maps(learner: Learner, episode: Any) -> dict[str, Tensor]:
    """Attention weights ``[T, H, L, L]`` of every ``SoftmaxAttention`` module in ``learner`` on ``episode``'s
    prefix predictions, by module name, recomputed as ``softmax(q kᵀ / √d)`` under the mask it was given."""
    maps: dict[str, Tensor] = {}
    handles = []

    def capture(name: str, module: SoftmaxAttention):
        def hook(_module, args, kwargs):
            h, mask = args[0], (args[1] if len(args) > 1 else kwargs.get("mask"))
            B, L, _ = h.shape
            H, D = module.n_head, module.head_dim
            q, k, _v = (t.view(B, L, H, D).transpose(1, 2) for t in module.qkv(h).split(H * D, dim=2))
            scores = q @ k.transpose(-1, -2) / math.sqrt(D)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            maps[name] = scores.softmax(-1)
        return hook

    for name, module in learner.named_modules():
        if isinstance(module, SoftmaxAttention):
            handles.append(module.register_forward_pre_hook(capture(name, module), with_kwargs=True))
    try:
        with torch.no_grad():
            learner.predict_prefixes(episode)
    finally:
        for handle in handles:
            handle.remove()
    return maps


def _check_claims(claims: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    checked = []
    for i, claim in enumerate(claims):
        claim = dict(claim)
        if sorted(claim) != ["above", "learner", "text"]:
            raise ValueError(f"nearest_example_heads: claims[{i}] takes text, learner and above (a bound on the "
                             f"learner's best head's mass / chance); got {sorted(claim)}")
        checked.append(claim | {"above": positive_float(f"claims[{i}].above", claim["above"],
                                                        owner="nearest_example_heads")})
    return checked


def _figure(panels: list[tuple[str, list[str], Tensor]], num_tasks: int, support: int):
    """One heat map per learner (layers × heads) of mass / chance, one colour range centred at chance (1)."""
    from matplotlib.colors import TwoSlopeNorm

    top = max(2.0, max(ratios.max().item() for _, _, ratios in panels))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)
    figure, axes = plotting.new_figure(len(panels), panel=(max(3.5, 1.2 + 0.7 * max(r.shape[1] for *_, r in panels)),
                                                           1.4 + 0.55 * max(len(m) for _, m, _ in panels)))
    for ax, (name, modules, ratios) in zip(axes, panels):
        image = plotting.heatmap(ax, ratios.numpy(), cmap="RdBu_r", norm=norm, ylabels=modules,
                                 xlabels=[str(h) for h in range(ratios.shape[1])], annotate=ratios.numel() <= 64,
                                 fmt="{:.1f}")
        ax.set_title(name)
        ax.set_xlabel("head")
        ax.set_ylabel("attention layer")
    plotting.colorbar(figure, image, axes, "nearest-example mass / chance")
    subtitle = (f"attention mass on the nearest earlier example over what uniform attention puts there, mean over "
                f"{num_tasks} tasks of {support} examples at every input after the first · 1 (white): chance")
    return plotting.finish(figure, "attention heads on the nearest earlier example", subtitle, legend="none")


def nearest_example_heads(learners: dict[str, Learner], family: TaskFamily, run: Run, seeds: SeedPlan,
                          device: str = "cpu", num_tasks: int = 256, support: int = 16,
                          claims: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Per learner with softmax attention, per head ``"<module> head <h>"``: the attention mass on the nearest
    earlier example, chance, and their ratio; the best head; a heat map (layers × heads of mass / chance).

    ``claims`` bound a learner's best ratio from below (``{text, learner, above}``): "some head of this learner
    attends to the nearest earlier example ``above`` times more than uniform attention would"."""
    positive_int("num_tasks", num_tasks, owner="nearest_example_heads")
    positive_int("support", support, owner="nearest_example_heads")
    claims = _check_claims(claims)
    episode = family.sample(num_tasks, support, 1, generator=torch.Generator().manual_seed(seeds.evaluation(13)))
    results: dict[str, Any] = {}
    panels = []
    for name, learner in learners.items():
        if not hasattr(learner, "predict_prefixes"):
            continue
        learner.eval()
        maps = attention_maps(learner, episode.to(device))
        if not maps:
            continue
        x = episode.x_support.to(device)
        rows, heads = [], {}
        for module, attention in maps.items():
            mass, chance = nearest_example_mass(attention, x)
            rows.append((mass / chance).cpu())
            for h, m in enumerate(mass.tolist()):
                heads[f"{module} head {h}"] = {"mass": m, "chance": chance.item(), "ratio": m / chance.item()}
        best = max(heads, key=lambda key: heads[key]["ratio"])
        results[name] = {"heads": heads, "best": best, "best_ratio": heads[best]["ratio"]}
        panels.append((name, list(maps), torch.stack(rows)))
    if panels:
        figure = _figure(panels, num_tasks, support)
        results["figure"] = str(run.save_figure(figure, "nearest_example_heads"))
    run.summary({f"nearest_heads/{name}/best_ratio": r["best_ratio"] for name, r in results.items() if name != "figure"})
    if claims:
        ratio = {name: r["best_ratio"] for name, r in results.items() if name != "figure"}
        for claim in claims:
            if claim["learner"] not in ratio:
                raise ValueError(f"nearest_example_heads: claim about {claim['learner']!r}, which has no softmax "
                                 f"attention heads (those that do: {sorted(ratio)})")
        results["claims"] = [{"text": c["text"], "learner": c["learner"], "measured": ratio[c["learner"]],
                              "above": c["above"], "holds": ratio[c["learner"]] > c["above"]} for c in claims]
        logger.info("nearest-example heads, claims (paper vs measured):\n%s", "\n".join(
            f"- {c['text']}\n    {c['learner']}'s best head: mass / chance {c['measured']:.2f} (expected > "
            f"{c['above']:g}) -> {'holds' if c['holds'] else 'DOES NOT HOLD'}" for c in results["claims"]))
    return results
