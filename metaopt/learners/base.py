"""The Learner contract: a module from an Episode to predictions on its queries."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Sequence

import torch
from torch import nn

from metaopt.checks import integer, sequence_of
from metaopt.episodes import Episode
from metaopt.learners.capabilities import Capability

if TYPE_CHECKING:
    from metaopt.tasks.base import TaskFamily


class Example(NamedTuple):
    """A small learner and the task family to run it on (``Learner.example``)."""

    learner: Learner
    family: TaskFamily | None = None


class Learner(nn.Module):
    """Maps an Episode to predictions ``[T, Q, ...]`` on its queries.

    Its ``nn.Parameter``s are its meta-parameters; a learner without any is evaluated, never trained.
    Subclasses set ``kinds`` (names of the episode kinds they apply to, see ``metaopt.kinds``) and
    ``implicit`` (True for in-context learners, whose optimisation happens inside a forward pass; False
    for explicit optimisers/solvers). The task loss comes from the episode's kind. ``capabilities``
    lists what it offers the analyses (``metaopt.learners.capabilities``).
    """

    kinds: ClassVar[tuple[str, ...]] = ("regression",)
    implicit: ClassVar[bool] = False
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.QUERY_GRADIENTS})

    @classmethod
    def example(cls) -> Example:
        """A small instance and a family to run it on (None: a family of any of its ``kinds``).

        The contract tests run every exported learner through its example, so a class whose
        constructor needs arguments overrides this with small ones; the default is ``cls()``.
        """
        return Example(cls())

    def forward(self, episode: Episode) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, episode: Episode) -> torch.Tensor:
        """The meta-training objective: the task loss on the queries."""
        return episode.kind.loss(self(episode), episode.y_query)

    def predict_by_support_size(self, episode: Episode, support_sizes: Sequence[int]) -> torch.Tensor:
        """Query predictions using only the first k support examples, for each k: ``[K, T, Q, ...]``.

        The default re-runs the learner per k; causal sequence models override it with one pass. ``support_sizes``
        must be a non-empty sequence of ints in ``[0, episode.num_support]`` (a ValueError naming it otherwise).
        """
        sizes = sequence_of("support_sizes", support_sizes, partial(integer, low=0, high=episode.num_support),
                            owner=f"{type(self).__name__}.predict_by_support_size")
        return torch.stack([self(episode.take_support(k)) for k in sizes])

    @property
    def is_trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def check_episode(self, episode: Episode) -> None:
        """Refuse an episode of a kind this learner does not handle."""
        if episode.kind not in self.kinds:
            raise ValueError(
                f"{type(self).__name__} handles episodes of kind {self.kinds}; got kind={episode.kind!r}"
            )

    def check_fits(self, episode: Episode) -> None:
        """Refuse episodes like ``episode`` (its kind, input and label sizes, support size) before any work.

        The pipeline calls it when a recipe is built, with a one-task probe of the largest episodes the run
        will use, so a learner that cannot take them fails at once rather than after meta-training. It must
        not compute on the episode or change the learner; subclasses add what they know (``max_support``,
        input sizes, a model's input shape).
        """
        self.check_episode(episode)


def check_module_input(owner: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``module``'s output for a batch like ``x``, computed on the meta device: shapes only, no arithmetic.

    Parameters and buffers are passed as meta copies, so the module (and batch-norm statistics) are untouched.
    Returns a meta tensor; raises ValueError naming ``owner`` when the module cannot take such inputs. A module
    with an operation that has no meta kernel is not checked (its output is None then).
    """
    meta = {name: t.to("meta") for name, t in [*module.named_parameters(), *module.named_buffers()]}
    try:
        with torch.no_grad():
            return torch.func.functional_call(module, meta, (x.to("meta"),))
    except NotImplementedError:
        return None
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise ValueError(f"{owner}: the model does not take inputs of shape {tuple(x.shape[1:])} "
                         f"(the episodes' inputs): {reason}") from error
