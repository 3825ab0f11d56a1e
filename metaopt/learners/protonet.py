"""Prototypical networks (Snell et al. 2017): the metric baseline of the MAML family; nothing is optimised per task.

Each class's prototype is the mean embedding of its support examples, ``c_k = mean_{i: y_i = k} f(x_i)``, and a
query's logits are its negative squared Euclidean distances to the prototypes, ``−‖f(x) − c_k‖²``. The
embedding network ``f`` is the meta-parameter. A class without support examples gets a zero prototype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt.episodes import Episode
from metaopt.learners.base import Example, Learner, check_module_input
from metaopt.learners.maml import NetworkSpec, build_network
from metaopt.tasks.images.few_shot import FewShotImages


def prototype_logits(support: Tensor, labels: Tensor, queries: Tensor, num_classes: int) -> Tensor:
    """``−‖q − c_k‖²`` for embeddings ``support`` ``[T, S, E]``, labels ``[T, S]`` and ``queries`` ``[T, Q, E]``.

    Returns ``[T, Q, num_classes]``.
    """
    one_hot = F.one_hot(labels, num_classes).to(support.dtype)  # [T, S, K]
    counts = one_hot.sum(1).clamp_min(1).unsqueeze(-1)  # [T, K, 1]
    prototypes = one_hot.transpose(1, 2) @ support / counts  # [T, K, E]
    return -(queries.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)


class ProtoNet(Learner):
    """Prototypical networks on the embeddings of ``network`` (a module or a :func:`build_network` spec).

    The network maps one batch of inputs ``[N, *x]`` to embeddings ``[N, E]`` (e.g. ``{"kind": "conv4",
    "out_features": None}``); the support and query examples of all tasks are embedded in one vmapped pass.
    """

    kinds = ("classification",)
    implicit = False

    @classmethod
    def example(cls) -> Example:
        return Example(cls({"kind": "conv4", "channels": 4, "out_features": None}), FewShotImages.example())

    def __init__(self, network: NetworkSpec) -> None:
        super().__init__()
        self.network = build_network(network)

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings ``[T, N, E]`` of inputs ``[T, N, *x]``, task by task (batch-norm statistics stay per task)."""
        return torch.func.vmap(self.network)(x).flatten(2)

    def check_fits(self, episode: Episode) -> None:
        """The kind, and that the network embeds the episode's inputs (on the meta device, no arithmetic)."""
        self.check_episode(episode)
        check_module_input("ProtoNet", self.network, episode.x_query[0])

    def forward(self, episode: Episode) -> Tensor:
        self.check_episode(episode)
        num_support = episode.num_support
        embedded = self.embed(torch.cat([episode.x_support, episode.x_query], dim=1))
        return prototype_logits(embedded[:, :num_support], episode.y_support, embedded[:, num_support:],
                                episode.num_classes)


__all__ = ["ProtoNet", "prototype_logits"]
