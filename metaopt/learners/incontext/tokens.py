"""Token formats shared by every in-context learner: how an Episode becomes a sequence.

Two formats, chosen by a setting of the learner (``token_format=``), never by a separate code path:

- ``"interleaved"`` (Garg et al. 2022): one token per input and one per label,
  ``[x1, 0], [0, y1], [x2, 0], [0, y2], …`` — ``2k`` context tokens for ``k`` examples.
- ``"concatenated"`` (von Oswald et al. 2023): one token per example, ``e_j = [x_j, y_j]`` — ``k``
  context tokens for ``k`` examples.

In both formats a query is the token ``[x_q, 0]``; models that follow von Oswald read their prediction
out as ``−(y-slot of the query)`` after the layers (``read_y_slot``). Every token is
``dim(x) + dim(y)`` wide, x first.

For causal models, ``prefix_mask`` lays out "context tokens + probe tokens" so that each probe sees
exactly a prefix of the context: predictions for every support size in one forward pass.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F

from metaopt.checks import integer, one_of, sequence_of
from metaopt.episodes import Episode

TOKEN_FORMATS: tuple[str, ...] = ("interleaved", "concatenated")


def check_token_format(owner: str, token_format: object) -> str:
    """``token_format`` if it is one of ``TOKEN_FORMATS``; a ValueError naming ``owner`` otherwise."""
    return one_of("token_format", token_format, TOKEN_FORMATS, owner=owner)  # type: ignore[return-value]


def episode_arrays(
    owner: str, episode: Episode, x_dim: int, y_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support inputs ``[T, S, x]``, support labels ``[T, S, y]`` and query inputs ``[T, Q, x]``, flattened.

    Raises:
        ValueError: if the episode's dimensions differ from the ones the learner was built for.
    """
    xs, ys, xq = episode.x_support.flatten(2), episode.y_support.flatten(2), episode.x_query.flatten(2)
    if xs.shape[-1] != x_dim or ys.shape[-1] != y_dim:
        raise ValueError(
            f"{owner} was built for x_dim={x_dim}, y_dim={y_dim}; got an episode with "
            f"x_dim={xs.shape[-1]}, y_dim={ys.shape[-1]}"
        )
    return xs, ys.to(xs.dtype), xq


def context_tokens(xs: torch.Tensor, ys: torch.Tensor, token_format: str) -> torch.Tensor:
    """Context tokens of support inputs ``[T, S, x]`` and labels ``[T, S, y]``.

    Returns ``[T, S, x + y]`` (concatenated) or ``[T, 2S, x + y]`` (interleaved, x token first).
    """
    T, S, D = xs.shape
    Y = ys.shape[-1]
    if token_format == "concatenated":
        return torch.cat([xs, ys], dim=-1)
    x_tok = F.pad(xs, (0, Y))  # [T, S, D + Y]
    y_tok = F.pad(ys, (D, 0))
    return torch.stack([x_tok, y_tok], dim=2).reshape(T, 2 * S, D + Y)


def query_tokens(xq: torch.Tensor, y_dim: int) -> torch.Tensor:
    """Query tokens ``[x_q, 0]``: ``[T, Q, x]`` -> ``[T, Q, x + y]``."""
    return F.pad(xq, (0, y_dim))


def context_length(num_examples: int, token_format: str) -> int:
    """Number of context tokens that hold the first ``num_examples`` examples."""
    return num_examples if token_format == "concatenated" else 2 * num_examples


def read_y_slot(tokens: torch.Tensor, y_dim: int) -> torch.Tensor:
    """von Oswald's read-out: ``−(y-slot)`` of each token, ``[..., x + y]`` -> ``[..., y]``."""
    return -tokens[..., -y_dim:]


def prefix_mask(
    num_context: int, visible: Sequence[int] | torch.Tensor, *, probes_see_themselves: bool, device: torch.device
) -> torch.Tensor:
    """Boolean attention mask ``[L, L]`` (True = may attend) of context tokens followed by probes.

    The ``num_context`` context tokens are causal (each sees itself and those before it). Probe ``p``
    sees the first ``visible[p]`` context tokens, itself if ``probes_see_themselves``, and no other
    probe, so probes never influence each other or the context.
    """
    visible = torch.as_tensor(visible, device=device, dtype=torch.long)
    n_probe = visible.numel()
    length = num_context + n_probe
    mask = torch.zeros(length, length, dtype=torch.bool, device=device)
    mask[:num_context, :num_context] = torch.ones(num_context, num_context, dtype=torch.bool, device=device).tril()
    mask[num_context:, :num_context] = torch.arange(num_context, device=device)[None, :] < visible[:, None]
    if probes_see_themselves:
        mask[num_context:, num_context:] = torch.eye(n_probe, dtype=torch.bool, device=device)
    return mask


def check_support_sizes(owner: str, support_sizes: Sequence[int], num_support: int) -> list[int]:
    """``support_sizes`` as a list of ints in ``[0, num_support]``; a ValueError otherwise."""
    in_range = partial(integer, low=0, high=num_support)
    return list(sequence_of("support_sizes", support_sizes, in_range, owner=f"{owner}.predict_by_support_size"))
