"""Decentralized learning with multi-headed distillation (Zhmoginov, Sandler, Miller, Kristiansen, Vladymyrov,
CVPR 2023), with the agents as a batch dimension.

Each communication round:

1. every agent predicts the public (unlabelled) set with each of its heads, ``p_j^h(x)``; these predictions are
   the only thing agents exchange (:func:`exchange`: a no-op in one process, an all-gather across ranks when
   each rank holds a group of agents);
2. every agent ``i`` builds, for each of its heads ``k`` and public example ``x``, a distillation target from
   its neighbours ``N(i)``: the main head (``k = 0``) reads the neighbours' main heads, auxiliary head ``k ≥ 1``
   reads their head ``k − 1``, so head ``k`` carries what is ``k + 1`` hops away. Among the neighbours, the
   most confident one (largest ``max_c p_j(c | x)``) is the teacher, and the example is distilled only if that
   teacher is more confident than the student's own head ``k`` (:func:`distillation_targets`; our reading of
   the paper's confidence-based choice);
3. ``steps_per_round`` local steps of Adam on ``L_i = CE(head_0(x_private), y_private)
   + ν Σ_k mean_x w_ik(x) · CE(target_ik(x), head_k(x_public))``, with soft-target cross-entropy.

Agent ``i``'s weights are its own slice of every parameter (:class:`~metaopt.distillation.agents.AgentModels`),
its loss reads only its own private data and the predictions it received, and Adam is elementwise, so summing
the agents' losses trains them independently: no data, weights or updates cross between agents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt import distributed
from metaopt.checks import boolean, non_negative_float, positive_float, positive_int
from metaopt.distillation.agents import AgentData, AgentModels


@dataclass
class DistillationSettings:
    """The training of a population: ``rounds`` of communication, ``steps_per_round`` local Adam steps each on
    ``batch_size`` private and ``public_batch`` public examples per agent, distillation weight ``nu``, the
    confidence gate (distil only from a teacher more confident than the student), evaluation cadence."""

    rounds: int = 30
    steps_per_round: int = 20
    batch_size: int = 32
    public_batch: int = 64
    lr: float = 1.0e-3
    nu: float = 1.0
    confidence_gate: bool = True
    eval_every: int = 2

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for key in ("rounds", "steps_per_round", "batch_size", "public_batch", "eval_every"):
            positive_int(key, getattr(self, key), owner=owner)
        positive_float("lr", self.lr, owner=owner)
        non_negative_float("nu", self.nu, owner=owner)
        boolean("confidence_gate", self.confidence_gate, owner=owner)


def source_heads(heads: int) -> Tensor:
    """Which neighbour head each head distils from: head 0 from head 0, head ``k ≥ 1`` from head ``k − 1``."""
    return (torch.arange(heads) - 1).clamp_min(0)


def distillation_targets(probs: Tensor, adjacency: Tensor, *, confidence_gate: bool = True) -> tuple[Tensor, Tensor]:
    """Every agent's distillation targets and weights from the exchanged public-set predictions.

    Args:
        probs: ``[A, H, U, C]``, agent ``j``'s head ``h`` probabilities on public example ``u``.
        adjacency: ``[A, A]`` bool, ``adjacency[i, j]``: agent ``i`` reads agent ``j`` (no self-loops).
        confidence_gate: keep an example only where the teacher is more confident than the student's own head.

    Returns:
        ``targets [A, H, U, C]``: for student ``i``, head ``k``, example ``u``, the source head's probabilities of
        the most confident neighbour; ``weights [A, H, U]`` (1.0 where distilled, 0.0 elsewhere, and everywhere
        for an agent without neighbours).
    """
    A, H, U, _ = probs.shape
    if adjacency.shape != (A, A) or adjacency.dtype != torch.bool:
        raise ValueError(f"distillation_targets: adjacency must be bool [{A}, {A}]; got {adjacency.dtype} "
                         f"{tuple(adjacency.shape)}")
    offered = probs[:, source_heads(H)]  # [A(j), H, U, C]: what j offers student head k
    confidence = offered.amax(-1)  # [A(j), H, U]
    candidates = torch.where(adjacency[:, :, None, None], confidence.unsqueeze(0), -1.0)  # [A(i), A(j), H, U]
    best_confidence, teacher = candidates.max(dim=1)  # [A, H, U]
    targets = offered[teacher, torch.arange(H)[None, :, None], torch.arange(U)[None, None, :]]  # [A, H, U, C]
    weights = adjacency.any(1)[:, None, None].expand(A, H, U)
    if confidence_gate:
        weights = weights & (best_confidence > probs.amax(-1))
    return targets, weights.to(probs.dtype)


def agent_losses(models: AgentModels, x_private: Tensor, y_private: Tensor, x_public: Tensor, targets: Tensor,
                 weights: Tensor, nu: float) -> Tensor:
    """Each agent's loss ``[A]``: cross-entropy of the main head on its private batch ``x [A, B, D]``, ``y [A, B]``
    plus ``nu`` times the weighted soft cross-entropy of every head on its public batch ``[A, B', D]`` against
    ``targets [A, H, B', C]`` with ``weights [A, H, B']`` (summed over heads, averaged over examples)."""
    logits = models(torch.cat([x_private, x_public], dim=1))  # [A, H, B + B', C]
    B = x_private.shape[1]
    private = F.cross_entropy(logits[:, 0, :B].flatten(0, 1), y_private.flatten(), reduction="none")
    soft = -(targets * logits[:, :, B:].log_softmax(-1)).sum(-1)  # [A, H, B']
    distilled = (weights * soft).sum(1).mean(1)
    return private.view(y_private.shape).mean(1) + nu * distilled


def exchange(local_probs: Tensor) -> Tensor:
    """The public-set predictions of every agent: this process's own ``[A_local, ...]`` in one process, those of
    every rank concatenated in rank order under ``torch.distributed`` (each rank a group of agents)."""
    return torch.cat([p.to(local_probs.device) for p in distributed.all_gather_objects(local_probs)], dim=0)


@torch.no_grad()
def public_predictions(models: AgentModels, public_x: Tensor) -> Tensor:
    """Every agent's head probabilities on the whole public set, ``[A, H, U, C]``."""
    A = models.head.weight.shape[0]
    return models(public_x.expand(A, *public_x.shape)).softmax(-1)


@torch.no_grad()
def evaluate(models: AgentModels, data: AgentData, head: int = 0) -> dict[str, Tensor]:
    """Each agent's accuracy with ``head`` on the global test set and on its private task (its classes): ``[A]``."""
    A = models.head.weight.shape[0]
    right = models(data.test_x.expand(A, *data.test_x.shape))[:, head].argmax(-1) == data.test_y  # [A, M]
    mask = data.private_mask()[:A] if A == data.agents else torch.ones_like(right)
    return {"global": right.float().mean(1), "private": (right & mask).sum(1) / mask.sum(1).clamp_min(1)}


def train_agents(models: AgentModels, data: AgentData, adjacency: Tensor, settings: DistillationSettings, *,
                 seed: int) -> list[dict[str, list[float]]]:
    """Train every agent for ``settings.rounds`` rounds (module docstring); returns the evaluations, one dict per
    evaluated round: ``round``, and per agent ``global``/``private`` accuracy of the main head and ``global_last``
    (the last auxiliary head)."""
    s = settings
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(models.parameters(), lr=s.lr)
    A, N = data.private_y.shape
    agents = torch.arange(A).unsqueeze(1)
    history = []
    for round_ in range(s.rounds):
        targets, weights = distillation_targets(exchange(public_predictions(models, data.public_x)), adjacency,
                                                confidence_gate=s.confidence_gate)
        for _ in range(s.steps_per_round):
            rows = torch.randint(N, (A, s.batch_size), generator=generator)
            public = torch.randint(len(data.public_x), (A, s.public_batch), generator=generator)
            index = public.unsqueeze(1).expand(A, targets.shape[1], s.public_batch)
            loss = agent_losses(models, data.private_x[agents, rows], data.private_y[agents, rows],
                                data.public_x[public], targets.gather(2, index.unsqueeze(-1).expand(
                                    *index.shape, targets.shape[-1])), weights.gather(2, index), s.nu).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if (round_ + 1) % s.eval_every == 0 or round_ + 1 == s.rounds:
            main, last = evaluate(models, data), evaluate(models, data, head=models.heads - 1)
            history.append({"round": round_ + 1, "global": main["global"].tolist(),
                            "private": main["private"].tolist(), "global_last": last["global"].tolist()})
    return history


__all__ = ["DistillationSettings", "source_heads", "distillation_targets", "agent_losses", "exchange",
           "public_predictions", "evaluate", "train_agents"]
