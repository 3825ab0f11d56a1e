"""Communication graphs between agents: who may read whose public-set predictions.

A graph is a boolean adjacency matrix ``[A, A]``, symmetric, with no self-loops: ``adjacency[i, j]`` means
agent ``i`` receives agent ``j``'s predictions on the public set (and nothing else).

============ ================================================================
kind         edges
============ ================================================================
complete     every pair
ring         ``i ~ i ± 1`` (mod A)
star         agent 0 ~ every other agent; the others only to agent 0
regular      a random ``degree``-regular graph (configuration model, redrawn
             until simple), from ``seed``
isolated     none: every agent learns alone (the baseline)
============ ================================================================
"""

from __future__ import annotations

import torch

from metaopt.checks import integer, one_of, positive_int

GRAPHS = ("complete", "ring", "star", "regular", "isolated")


def communication_graph(kind: str, agents: int, *, degree: int | None = None, seed: int = 0) -> torch.Tensor:
    """The adjacency ``[agents, agents]`` (bool, symmetric, zero diagonal) of a graph of ``kind`` (:data:`GRAPHS`).

    Raises:
        ValueError: an unknown kind, fewer than 2 agents, or a ``degree`` that no simple graph of that size has.
    """
    one_of("kind", kind, GRAPHS, owner="communication_graph")
    agents = integer("agents", agents, owner="communication_graph", low=2)
    adjacency = torch.zeros(agents, agents, dtype=torch.bool)
    index = torch.arange(agents)
    if kind == "complete":
        adjacency[:] = True
    elif kind == "ring":
        adjacency[index, (index + 1) % agents] = True
        adjacency[index, (index - 1) % agents] = True
    elif kind == "star":
        adjacency[0, 1:] = adjacency[1:, 0] = True
    elif kind == "regular":
        if degree is None:
            raise ValueError("communication_graph: kind='regular' needs degree=k (each agent's neighbours)")
        adjacency = _random_regular(agents, integer("degree", degree, owner="communication_graph", low=1,
                                                    high=agents - 1), seed)
    adjacency.fill_diagonal_(False)
    return adjacency


def _random_regular(agents: int, degree: int, seed: int, attempts: int = 1000) -> torch.Tensor:
    """A uniformly drawn simple ``degree``-regular graph: pair up ``degree`` stubs per agent at random, redraw
    while a pairing has a self-loop or a double edge (the configuration model with rejection)."""
    if agents * degree % 2:
        raise ValueError(f"communication_graph: a {degree}-regular graph on {agents} agents does not exist "
                         "(agents * degree must be even)")
    generator = torch.Generator().manual_seed(seed)
    stubs = torch.arange(agents).repeat_interleave(degree)
    for _ in range(attempts):
        pairs = stubs[torch.randperm(len(stubs), generator=generator)].view(-1, 2)
        a, b = pairs[:, 0], pairs[:, 1]
        edges = torch.minimum(a, b) * agents + torch.maximum(a, b)
        if bool((a != b).all()) and len(edges.unique()) == len(edges):
            adjacency = torch.zeros(agents, agents, dtype=torch.bool)
            adjacency[a, b] = adjacency[b, a] = True
            return adjacency
    raise ValueError(f"communication_graph: no simple {degree}-regular graph on {agents} agents found in "
                     f"{attempts} draws; expected a smaller degree")


def hops(adjacency: torch.Tensor) -> torch.Tensor:
    """Shortest-path lengths ``[A, A]`` (``A`` where unreachable): how far knowledge must travel."""
    agents = positive_int("agents", adjacency.shape[0], owner="hops")
    distance = torch.full((agents, agents), agents, dtype=torch.long)
    reached = torch.eye(agents, dtype=torch.bool)
    distance[reached] = 0
    for step in range(1, agents):
        reached = reached | (reached.float() @ adjacency.float() > 0)
        distance[reached & (distance == agents)] = step
    return distance


__all__ = ["GRAPHS", "communication_graph", "hops"]
