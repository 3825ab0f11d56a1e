"""Functional, differentiable optimizers in the optax style, and a bridge to ``torch.optim``.

An optimizer is ``GradientTransformation(init, update)`` on dicts of tensors; see :mod:`optimizers.base`.
This package imports only torch. Everything in ``alias.__all__`` and ``transforms.__all__`` is exported here, so a
new optimizer or direction (see :mod:`optimizers.alias`) needs no edit of this file.
"""

from optimizers import alias, averaging, pruning, transforms
from optimizers.alias import *  # noqa: F403 (the optimizers and their directions: alias.__all__)
from optimizers.averaging import *  # noqa: F403 (iterate averaging: averaging.__all__)
from optimizers.pruning import *  # noqa: F403 (ignore-k update pruning: pruning.__all__)
from optimizers.base import (
    EmptyState,
    GradientTransformation,
    Hyperparameters,
    InPlaceUpdate,
    OptState,
    Params,
    Schedule,
    Workspace,
    apply_in_place,
    apply_updates,
    chain,
    identity,
    tree_map,
    tree_update,
)
from optimizers.environments import Environment, TrainState, Unroll, mlp_apply, mlp_init
from optimizers.estimators import (
    PES,
    AntitheticES,
    FullBackprop,
    GradientEstimate,
    GradientEstimator,
    TruncatedBackprop,
)
from optimizers.layers import layer_groups, layer_kinds, match_layers
from optimizers.learned import LayerwiseMixture, LayerwiseMixtureState, PerParameterMLP, PerParameterMLPState
from optimizers.saving import learned_optimizer_file, load, load_learned, save
from optimizers.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    join_schedules,
    linear_schedule,
    warmup_cosine_decay_schedule,
)
from optimizers.torch_adapter import FunctionalOptimizer, as_torch_optimizer
from optimizers.transforms import *  # noqa: F403 (the transforms and their states: transforms.__all__)

__all__ = [
    "AntitheticES",
    "Environment",
    "FullBackprop",
    "GradientEstimate",
    "GradientEstimator",
    "PES",
    "TrainState",
    "TruncatedBackprop",
    "Unroll",
    "mlp_apply",
    "mlp_init",
    "EmptyState",
    "FunctionalOptimizer",
    "InPlaceUpdate",
    "GradientTransformation",
    "Hyperparameters",
    "LayerwiseMixture",
    "LayerwiseMixtureState",
    "OptState",
    "Params",
    "PerParameterMLP",
    "PerParameterMLPState",
    "Schedule",
    "Workspace",
    "apply_in_place",
    "apply_updates",
    "as_torch_optimizer",
    "chain",
    "constant_schedule",
    "cosine_decay_schedule",
    "identity",
    "join_schedules",
    "layer_groups",
    "layer_kinds",
    "learned_optimizer_file",
    "linear_schedule",
    "load",
    "load_learned",
    "match_layers",
    "save",
    "tree_map",
    "tree_update",
    "warmup_cosine_decay_schedule",
]
__all__ += alias.__all__
__all__ += transforms.__all__
__all__ += averaging.__all__
__all__ += pruning.__all__
