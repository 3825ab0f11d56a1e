"""Agents as a batch dimension: their private and public data, and their models, stacked over agents.

Every tensor that belongs to agents has the agent dimension ``A`` first (the project's task dimension), so
8–16 small agents train in one process with batched matrix products; agent ``a``'s weights are slice ``a``
of every parameter and its loss depends only on that slice, its own private data and the predictions it
received (``tests/test_distillation.py`` holds this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metaopt.checks import integer, one_of, positive_int, probability
from metaopt.tasks.images.digits import Digits
from metaopt.tasks.images.glyphs import Glyphs

SOURCES = ("glyphs", "digits")


@dataclass(frozen=True)
class AgentData:
    """The data of a population of agents (images flattened to vectors).

    Fields: ``private_x [A, N, D]`` and ``private_y [A, N]`` (each agent's own labelled set),
    ``public_x [U, D]`` (unlabelled, shared), ``test_x [M, D]``, ``test_y [M]`` (the global test set, every
    class equally), ``agent_classes [A, K]`` (the classes each agent's data is skewed towards).
    """

    private_x: Tensor
    private_y: Tensor
    public_x: Tensor
    test_x: Tensor
    test_y: Tensor
    agent_classes: Tensor
    num_classes: int

    @property
    def agents(self) -> int:
        return self.private_x.shape[0]

    def private_mask(self) -> Tensor:
        """``[A, M]``: which global test examples belong to each agent's private task (its classes)."""
        return (self.test_y.unsqueeze(0).unsqueeze(-1) == self.agent_classes.unsqueeze(1)).any(-1)


def _class_images(source: str, classes: int, per_class: int, image_size: int, generator: torch.Generator) -> Tensor:
    """``[classes, per_class, D]`` images of ``source`` flattened (glyphs: fresh samples of train classes)."""
    if source == "glyphs":
        images = Glyphs(size=image_size).sample("train", torch.arange(classes), per_class, generator)
    else:
        digits = Digits(size=image_size)
        pools = [digits.class_images(split, i) for split in ("train", "val", "test")
                 for i in range(digits.num_classes(split))][:classes]
        have = min(len(p) for p in pools)
        if per_class > have:
            raise ValueError(f"agent_data: the bundled digits have {have} images per class; got a need for "
                             f"{per_class} (reduce per_agent, public or test)")
        images = torch.stack([p[torch.randperm(len(p), generator=generator)[:per_class]] for p in pools])
    return images.flatten(2)


def agent_data(*, agents: int, num_classes: int, classes_per_agent: int, skew: float, per_agent: int,
               public: int, test_per_class: int, source: str = "glyphs", image_size: int = 16,
               seed: int = 0) -> AgentData:
    """Private non-iid labelled sets, a shared unlabelled public set and a global test set.

    Agent ``a`` is given ``classes_per_agent`` consecutive classes starting at ``a · num_classes / agents``
    (wrapping around); each of its ``per_agent`` private examples comes from those classes with probability
    ``skew`` and from any class otherwise (``skew=1``: only its own classes; ``skew=0``: iid). The public set
    is ``public`` examples of every class equally, without labels. All sets are disjoint.
    """
    owner = "agent_data"
    one_of("source", source, SOURCES, owner=owner)
    agents, per_agent = integer("agents", agents, owner=owner, low=1), positive_int("per_agent", per_agent, owner=owner)
    num_classes = integer("num_classes", num_classes, owner=owner, low=2, high=10 if source == "digits" else None)
    k = integer("classes_per_agent", classes_per_agent, owner=owner, low=1, high=num_classes)
    skew = probability("skew", skew, owner=owner)
    generator = torch.Generator().manual_seed(seed)
    starts = (torch.arange(agents) * num_classes) // agents
    agent_classes = (starts.unsqueeze(1) + torch.arange(k)) % num_classes  # [A, K]
    own = torch.rand(agents, per_agent, generator=generator) < skew
    labels = torch.where(own, agent_classes.gather(1, torch.randint(k, (agents, per_agent), generator=generator)),
                         torch.randint(num_classes, (agents, per_agent), generator=generator))
    public_per_class = math.ceil(public / num_classes)
    counts = torch.bincount(labels.flatten(), minlength=num_classes)
    need = int(counts.max()) + public_per_class + test_per_class
    images = _class_images(source, num_classes, need, image_size, generator)  # [C, need, D]
    taken = torch.zeros(num_classes, dtype=torch.long)
    private = torch.empty(agents, per_agent, images.shape[-1])
    for a in range(agents):  # each example is a distinct image: a running index per class
        for i, c in enumerate(labels[a].tolist()):
            private[a, i] = images[c, taken[c]]
            taken[c] += 1
    rest = int(counts.max())
    public_x = images[:, rest:rest + public_per_class].flatten(0, 1)[torch.randperm(
        num_classes * public_per_class, generator=generator)[:public]]
    test = images[:, rest + public_per_class:]
    test_y = torch.arange(num_classes).repeat_interleave(test_per_class)
    return AgentData(private, labels, public_x, test.flatten(0, 1), test_y, agent_classes, num_classes)


class BatchedLinear(nn.Module):
    """``A`` independent linear layers: ``x [A, B, in] -> [A, B, out]``, agent ``a`` with its own weight slice,
    each initialised as ``nn.Linear`` (uniform in ±1/√in)."""

    def __init__(self, agents: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(agents, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(agents, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class AgentModels(nn.Module):
    """Every agent's network at once: an MLP backbone and ``heads`` linear heads on its features.

    ``forward(x [A, B, D]) -> logits [A, heads, B, classes]``: head 0 is the main head (private labels and
    distillation), heads 1.. are the auxiliary heads.
    """

    def __init__(self, agents: int, in_features: int, num_classes: int, *, hidden: int = 128, depth: int = 2,
                 heads: int = 1) -> None:
        super().__init__()
        owner = "AgentModels"
        self.heads, self.num_classes = positive_int("heads", heads, owner=owner), num_classes
        widths = [positive_int("in_features", in_features, owner=owner)] + [positive_int(
            "hidden", hidden, owner=owner)] * positive_int("depth", depth, owner=owner)
        self.backbone = nn.ModuleList(BatchedLinear(agents, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = BatchedLinear(agents, hidden, heads * num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.backbone:
            h = torch.relu(layer(h))
        A, B = x.shape[:2]
        return self.head(h).view(A, B, self.heads, self.num_classes).transpose(1, 2)  # [A, heads, B, C]


__all__ = ["SOURCES", "AgentData", "agent_data", "BatchedLinear", "AgentModels"]
