"""A trained learned optimizer as one self-contained file, and back as a ``torch.optim.Optimizer``.

    O.save(mixture, "mixture.pt", recipe=settings, metrics=results)   # after meta-training
    opt = O.load("mixture.pt", model.named_parameters())              # in any other script
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)

The file is plain data, so ``torch.load(path, weights_only=True)`` reads it and loading runs no code:

- ``format``, ``version``, ``class`` (``"LayerwiseMixture"`` or ``"PerParameterMLP"``, the only classes it builds);
- ``arguments``: the constructor's arguments (``module.arguments``), ``state_dict``: its meta-parameters;
- ``layers`` (a mixture): each layer's name, kind and parameter names, under ``layer_rule``
  (:mod:`optimizers.layers`), with ``base_lrs`` and ``horizon`` also at the top for reading;
- ``recipe`` and ``metrics``: how it was meta-trained and how that went (plain containers, or None).

:func:`load` maps a mixture onto the parameters it is given: parameters with the names it was trained on get their
own layers' coefficients (the same updates bit for bit); any other model is matched layer by layer by kind and
relative depth (:func:`optimizers.layers.match_layers`), and a kind the mixture has never seen is refused.
A :class:`~optimizers.PerParameterMLP` is the same rule for every parameter and loads onto any model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from optimizers._checks import positive_int
from optimizers.base import GradientTransformation
from optimizers.layers import RULE, layer_groups, layer_kinds, match_layers
from optimizers.learned import LayerwiseMixture, PerParameterMLP
from optimizers.torch_adapter import FunctionalOptimizer, as_torch_optimizer

__all__ = ["FORMAT", "VERSION", "learned_optimizer_file", "load", "load_learned", "read", "save"]

FORMAT, VERSION = "metaopt-learned-optimizer", 1
CLASSES: dict[str, type[nn.Module]] = {"LayerwiseMixture": LayerwiseMixture, "PerParameterMLP": PerParameterMLP}
NamedParams = Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]


def _module_of(learned: nn.Module | GradientTransformation | FunctionalOptimizer) -> nn.Module:
    """The learned optimizer's module: given, or the one whose ``.optimizer`` built the transform."""
    if isinstance(learned, FunctionalOptimizer):
        learned = learned._default_optimizer
    if isinstance(learned, GradientTransformation) and learned.hyperparams is not None:
        learned = getattr(learned.hyperparams.factory, "__self__", learned)
    if type(learned) not in CLASSES.values():
        raise ValueError(f"save takes a LayerwiseMixture or PerParameterMLP, an optimizer built by one's .optimizer(), "
                         f"or its as_torch_optimizer; got {type(learned).__name__}")
    return learned


def _plain(value: Any, where: str) -> Any:
    """``value`` as the containers ``weights_only`` loading accepts (tuples become lists); anything else refused."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"{where}: keys must be strings; got {sorted(map(repr, value))}")
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{where} is a {type(value).__name__}; a learned-optimizer file holds numbers, strings, lists "
                     "and dicts only (convert it, e.g. OmegaConf.to_container)")


def learned_optimizer_file(
    learned: nn.Module | GradientTransformation | FunctionalOptimizer,
    *,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    params: NamedParams | None = None,
) -> dict[str, Any]:
    """What :func:`save` writes, as a dict (to write it another way, e.g. atomically).

    ``params``: the model the mixture was meta-trained for, to record its layers' kinds when the mixture was
    built without ``layer_kinds`` (needed to load it onto other models).
    """
    module = _module_of(learned)
    arguments = _plain(module.arguments, "arguments")
    layers = None
    if isinstance(module, LayerwiseMixture):
        kinds = module.layer_kinds
        if kinds is None and params is not None:
            named = dict(params)
            missing = sorted(k for names in arguments["layers"].values() for k in names if k not in named)
            if missing:
                raise ValueError(f"params lacks the mixture's parameters {missing!r}; give the model it was "
                                 "meta-trained for (model.named_parameters())")
            kinds = list(layer_kinds(named, arguments["layers"]).values())
            arguments["layer_kinds"] = dict(zip(module.layer_names, kinds))
        kinds = kinds or [None] * len(module.layer_names)
        layers = [{"name": layer, "kind": kind, "parameters": list(names)}
                  for (layer, names), kind in zip(arguments["layers"].items(), kinds)]
    return {
        "format": FORMAT, "version": VERSION, "class": type(module).__name__, "arguments": arguments,
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "layer_rule": RULE if layers is not None else None, "layers": layers,
        "base_lrs": arguments.get("base_lrs"), "horizon": arguments.get("horizon"),
        "recipe": _plain(recipe, "recipe"), "metrics": _plain(metrics, "metrics"),
    }


def save(
    learned: nn.Module | GradientTransformation | FunctionalOptimizer,
    path: str | os.PathLike,
    *,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    params: NamedParams | None = None,
) -> Path:
    """Write a learned optimizer (a module, its ``.optimizer()``, or that wrapped by ``as_torch_optimizer``) and
    how it was meta-trained to one file; see the module docstring and :func:`learned_optimizer_file`."""
    path = Path(path)
    torch.save(learned_optimizer_file(learned, recipe=recipe, metrics=metrics, params=params), path)
    return path


def read(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A learned-optimizer file's contents (loaded with ``weights_only=True``), checked.

    Raises:
        ValueError: the file is not one :func:`save` wrote, or of a later version.
    """
    content = source if isinstance(source, Mapping) else torch.load(source, map_location="cpu", weights_only=True)
    name = "the given record" if isinstance(source, Mapping) else str(source)
    if not isinstance(content, Mapping) or content.get("format") != FORMAT:
        found = sorted(content)[:6] if isinstance(content, Mapping) else type(content).__name__
        raise ValueError(f"{name} is not a learned-optimizer file (format {FORMAT!r}); it holds {found!r}. A run's "
                         "checkpoints/<name>.pt is a state dict: load it into the module with load_state_dict")
    if content.get("version", 0) > VERSION or content.get("class") not in CLASSES:
        raise ValueError(f"{name}: version {content.get('version')!r} of class {content.get('class')!r}; this "
                         f"library reads versions <= {VERSION} of {sorted(CLASSES)}")
    return dict(content)


def load_learned(
    source: str | os.PathLike | Mapping[str, Any], params: NamedParams | None = None, *, horizon: int | None = None
) -> nn.Module:
    """The learned optimizer of a file as a module, its mixture layers mapped onto ``params`` when given.

    ``horizon`` replaces the mixture's: the progress feature ``t/T`` then reaches 1 at ``horizon``, which runs the
    learned schedule over that many steps.

    Raises:
        ValueError: ``params`` has a layer of a kind the mixture has no layer of, or the file records no kinds and
            the names differ from those it was meta-trained on.
    """
    content = read(source)
    arguments, state = dict(content["arguments"]), dict(content["state_dict"])
    if horizon is not None:
        arguments["horizon"] = positive_int("horizon", horizon, owner="load")
    if content["class"] == "LayerwiseMixture" and params is not None:
        arguments, state = _mapped(content, arguments, state, dict(params))
    module = CLASSES[content["class"]](**arguments)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
    if dtype is not None:
        module.to(dtype)
    module.load_state_dict(state)
    return module


def _mapped(content: Mapping[str, Any], arguments: dict[str, Any], state: dict[str, Tensor],
            params: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The mixture's arguments and meta-parameters for the layers of ``params`` (see the module docstring)."""
    trained = [k for layer in content["layers"] for k in layer["parameters"]]
    kinds = [layer["kind"] for layer in content["layers"]]
    same_names = set(params) == set(trained)
    if same_names and (None in kinds or kinds == list(layer_kinds(params, arguments["layers"]).values())):
        return arguments, state  # the model it was meta-trained for
    if None in kinds:  # a mixture built from names alone
        raise ValueError(
            f"this mixture was meta-trained on parameters {trained!r} and records no layer kinds, so it loads only "
            f"onto parameters of those names; got {sorted(params)!r} (save it with params=model.named_parameters() "
            "to record the kinds)"
        )
    groups = layer_groups(params)
    targets = layer_kinds(params, groups)
    try:
        rows = torch.tensor(match_layers(kinds, list(targets.values())))
    except ValueError as error:
        raise ValueError(f"cannot load this mixture onto these parameters: {error}") from None
    per_layer = {"embedding", "alpha0", "alpha"}  # the meta-parameters with one row per layer
    state = {k: v[rows] if k in per_layer else v for k, v in state.items()}
    return {**arguments, "layers": groups, "layer_kinds": targets}, state


def load(
    source: str | os.PathLike | Mapping[str, Any],
    params: NamedParams,
    *,
    lr: float | None = None,
    horizon: int | None = None,
    missing_loss: str = "estimate",
) -> FunctionalOptimizer:
    """A ``torch.optim.Optimizer`` over ``params`` (``model.named_parameters()``) running the file's learned rule.

    ``lr`` is the factor on the learned step (default 1: as meta-trained); ``horizon`` as in :func:`load_learned`;
    ``missing_loss="estimate"`` (the default here) lets ``step()`` run without the loss, the loss features holding
    their running estimate (``"error"`` refuses it; see :meth:`LayerwiseMixture.optimizer`).
    """
    params = list(params.items()) if isinstance(params, Mapping) else list(params)
    if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
        raise ValueError("load needs named parameters (model.named_parameters() or a {name: parameter} dict): a "
                         "learned mixture finds its layers by name")
    module = load_learned(source, params, horizon=horizon)
    transform = (module.optimizer(missing_loss=missing_loss) if isinstance(module, LayerwiseMixture)
                 else module.optimizer())
    return as_torch_optimizer(transform, params, lr=lr)
