"""The one MLP builder: ``in → hidden… → out`` linear layers with an activation between them.

Every feed-forward network of the project is built here: MAML's regression network, the MLP of each
transformer block (``attention.Block``), Hyena's implicit filter and block MLP. It returns a plain
``nn.Sequential`` (linear layers at the even indices), so parameter names are ``0.weight``, ``2.weight``, …,
``InnerLoop`` and task folding read it like any sequential model, and initialisations that name the last
layer (``mlp[-1]``, ``"mlp.2.weight"``) find it. ``optimizers/`` keeps a private twin: it imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from metaopt.checks import positive_int, probability


def mlp(
    in_features: int = 1,
    hidden: Sequence[int] = (40, 40),
    out_features: int = 1,
    *,
    activation: Callable[[], nn.Module] = nn.ReLU,
    dropout: float = 0.0,
) -> nn.Sequential:
    """``Linear, activation, …, Linear`` through the sizes ``[in_features, *hidden, out_features]``.

    The defaults are Finn et al.'s sinusoid network (1-40-40-1, ReLU).

    Args:
        in_features, out_features: input and output width.
        hidden: the widths of the hidden layers (empty: a single linear layer).
        activation: the activation layer type, called with no arguments (``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``).
        dropout: dropout on the output (training only); no dropout layer when 0.

    Raises:
        ValueError: if a width is not a positive int or ``dropout`` is not a probability.
    """
    sizes = [positive_int("in_features", in_features, owner="mlp")]
    sizes += [positive_int(f"hidden[{i}]", width, owner="mlp") for i, width in enumerate(hidden)]
    sizes.append(positive_int("out_features", out_features, owner="mlp"))
    dropout = probability("dropout", dropout, owner="mlp")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


__all__ = ["mlp"]
