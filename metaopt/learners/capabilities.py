"""What a learner offers beyond the Learner contract, so that analyses pick learners by what they can do.

Every learner maps an episode to query predictions; some analyses need more than that (an input
sensitivity needs predictions differentiable in the query inputs, Dai et al.'s dual form needs
softmax attention over tokens). A learner class lists the capabilities it provides in its
``capabilities`` class attribute; an analysis names the capabilities it needs
(``metaopt.analysis.suite``) and runs on every learner that provides them, whatever its class.

Some capabilities come with methods the learner must then define; each member says which.
"""

from __future__ import annotations

import enum

from torch import nn


class Capability(enum.Enum):
    """A capability a learner can declare; the value names it in messages and results."""

    QUERY_GRADIENTS = "query_gradients"
    """Predictions are differentiable functions of ``episode.x_query`` (``torch.func.jacrev`` runs through
    ``predict_by_support_size``), and each query's prediction depends on its own input only. The default
    of every ``Learner``; a learner that leaves torch (scikit-learn) or runs autograd inside its forward
    pass (a per-task fitted MLP) drops it."""

    GD_CONSTRUCTION = "gd_construction"
    """Its architecture has an exact construction of gradient descent on least squares (von Oswald et al.):
    the learner defines ``gd_steps`` (the number of GD steps the construction takes) and
    ``gd_construction(lr)`` (that construction with step size ``lr``: a learner of the same class and
    parameter shapes, on the same device and dtype)."""

    ATTENTION_DUAL_FORM = "attention_dual_form"
    """A causal transformer in ``metaopt.learners.Transformer``'s layout: interleaved ``x, y`` support
    tokens followed by one token per query, and ``blocks[i].attn`` a softmax (or momentum) attention
    with a fused ``qkv`` projection, whose key and value rows Dai et al.'s finetuning updates."""

    @property
    def description(self) -> str:
        """A few words saying what the capability is, for the reasons an analysis skips a learner."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Capability.QUERY_GRADIENTS: "predictions differentiable in x_query",
    Capability.GD_CONSTRUCTION: "an exact gradient-descent construction in its architecture",
    Capability.ATTENTION_DUAL_FORM: "softmax attention over interleaved (x, y) tokens with a fused qkv projection",
}


def provides(learner: nn.Module, capability: Capability) -> bool:
    """Whether ``learner`` declares ``capability`` (modules that are not learners declare none)."""
    return capability in getattr(learner, "capabilities", frozenset())


def missing(learner: nn.Module, needs: frozenset[Capability]) -> list[Capability]:
    """The capabilities of ``needs`` that ``learner`` does not declare, in declaration order."""
    return [capability for capability in Capability if capability in needs and not provides(learner, capability)]


__all__ = ["Capability", "provides", "missing"]
