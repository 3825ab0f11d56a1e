"""The layer-group rule: which parameters form one layer of a :class:`~optimizers.LayerwiseMixture`, and its kind.

A layer is one module's own parameters: a name up to its last dot (``"blocks.0.mlp.fc.weight"`` belongs to
layer ``"blocks.0.mlp.fc"``; the top-level module's own parameters form layer ``""``). A layer's *kind* is read from its shapes:
``"conv1d"``/``"conv2d"``/``"conv3d"`` when its largest parameter has 3/4/5 dimensions, ``"matrix"`` for 2
(linear layers, embeddings, attention projections), ``"vector"`` when all are 1-dimensional (norms, a lone
bias) and ``"scalar"`` for 0-dimensional ones. Only names and shapes are read, so ``model.named_parameters()``
is enough, and a saved mixture is mapped onto another model by the same rule (:data:`RULE` names it in the file).

Mapping a mixture onto a model of another depth (:func:`match_layers`) keeps each kind apart and pairs layers by
relative depth within their kind: the first matrix layer takes the first's coefficients, the last the last's,
the ones between the nearest by position (ties to the shallower one). Models with the same kinds in the same
order map one to one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor

__all__ = ["KINDS", "RULE", "layer_groups", "layer_kind", "layer_kinds", "match_layers"]

RULE = "module-prefix layers, kinds by parameter shape (v1)"
KINDS = ("scalar", "vector", "matrix", "conv1d", "conv2d", "conv3d")


def layer_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """``{layer: [parameter names]}`` in the order the names first appear (a model's depth order)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    return groups


def layer_kind(shapes: Sequence[Sequence[int]]) -> str:
    """The kind of a layer whose parameters have ``shapes`` (see the module docstring)."""
    if not shapes:
        raise ValueError("layer_kind: shapes is empty; a layer has at least one parameter")
    dims = max(len(s) for s in shapes)
    if dims > 5:
        raise ValueError(f"layer_kind: a {dims}-dimensional parameter has no kind; kinds are {list(KINDS)}")
    return KINDS[dims]


def layer_kinds(params: Mapping[str, Tensor], groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """Each layer's kind, for ``groups`` (default: :func:`layer_groups` of ``params``)."""
    groups = layer_groups(params) if groups is None else groups
    return {layer: layer_kind([tuple(params[k].shape) for k in names]) for layer, names in groups.items()}


def match_layers(source: Sequence[str], target: Sequence[str]) -> list[int]:
    """For each target layer (given by kind, in depth order), the index of the source layer it takes after.

    Raises:
        ValueError: a target kind the source has no layer of.
    """
    positions: dict[str, list[int]] = {}
    for index, kind in enumerate(source):
        positions.setdefault(kind, []).append(index)
    missing = sorted(set(target) - set(positions))
    if missing:
        raise ValueError(
            f"no layer of kind {missing!r} to take coefficients from: the learned optimizer has layers of kinds "
            f"{sorted(positions)!r} (by the rule {RULE!r}); meta-train it on a model with such layers"
        )
    counts = {kind: target.count(kind) for kind in set(target)}
    seen = dict.fromkeys(counts, 0)
    matched = []
    for kind in target:
        candidates, place = positions[kind], (seen[kind] + 0.5) / counts[kind]
        nearest = min(range(len(candidates)), key=lambda j: abs((j + 0.5) / len(candidates) - place))
        matched.append(candidates[nearest])  # min keeps the first of equals: ties go to the shallower layer
        seen[kind] += 1
    return matched
