"""Episode kinds: what an episode's labels are, and everything that follows from that.

A kind is one object that carries its label layout and validation, its task loss, its default
metric, what "right" means for one query, and how predictions turn into probabilities. Every
module asks the kind instead of switching on its name, so a new kind is one new subclass here.

The three kinds are strings as well (``REGRESSION == "regression"``): recipes, YAML, JSON and
``Learner.kinds`` declarations name them, ``Episode(kind="binary")`` accepts the name and stores
the object, and ``episode.kind == "binary"`` keeps reading as it always did.

============== ================================= =========================== ======================
kind           labels ``y``                      predictions                 loss, default metric
============== ================================= =========================== ======================
regression     float ``[T, N, *y]``              values ``[T, Q, *y]``       MSE, normalised error
binary         float in {0, 1}, ``[T, N, 1]``    logits ``[T, Q, 1]``        BCE on logits, accuracy
classification integer ids ``[T, N]`` < classes  logits ``[T, Q, classes]``  cross-entropy, accuracy
============== ================================= =========================== ======================
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from metaopt.checks import integer
from metaopt.metrics import Accuracy, Metric, NormalizedError

Kind = Literal["regression", "classification", "binary"]


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


class EpisodeKind(str):
    """The kind of an episode's labels; equal to (and hashed as) its name.

    Subclasses define the label layout (``validate_labels``, ``validate_num_classes``,
    ``prediction_shape``), the task loss, the default metric, per-query correctness and the
    probability view of predictions. Instances hold no state.
    """

    __slots__ = ()

    discrete: ClassVar[bool]
    """True when a prediction decides a label (right or wrong); False for real values scored by error."""

    def validate_labels(self, y: torch.Tensor, *, name: str = "labels") -> None:
        """Refuse labels ``[T, N, ...]`` of the wrong dtype or layout for this kind (``name`` is the field)."""
        raise NotImplementedError  # pragma: no cover - every kind overrides it

    def validate_num_classes(self, num_classes: int | None, *, owner: str = "Episode") -> None:
        """Refuse a class count this kind cannot use (``owner`` names the holder); only classification needs one."""
        del num_classes, owner

    def prediction_shape(self, targets_shape: torch.Size, num_classes: int | None = None) -> torch.Size:
        """The shape of a learner's predictions for labels of shape ``targets_shape`` (``[T, Q, ...]``)."""
        del num_classes
        return torch.Size(targets_shape)

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task loss of ``predictions`` against ``targets``, averaged over every leading dimension."""
        raise NotImplementedError  # pragma: no cover - every kind overrides it

    def metric(self, error_scale: float = 1.0) -> Metric:
        """How ``compare`` scores this kind by default: accuracy for discrete labels (``error_scale`` normalises
        regression errors, which override this)."""
        del error_scale
        return Accuracy()

    def correct(
        self, predictions: torch.Tensor, targets: torch.Tensor, *, tolerance: float | None = None
    ) -> torch.Tensor:
        """Which queries are right, ``[..., T, Q]`` bool, for predictions ``[..., T, Q, ...]``.

        Discrete kinds compare the decided label; regression needs ``tolerance`` (squared error below it).
        """
        raise NotImplementedError  # pragma: no cover - every kind overrides it

    def probabilities(self, predictions: torch.Tensor) -> torch.Tensor:
        """The predicted probabilities: sigmoid of binary logits, softmax over classes."""
        raise ValueError(f"kind={self!r} predictions are values, not probabilities")

    def comparable(self, predictions: torch.Tensor) -> torch.Tensor:
        """Predictions in the form two learners' outputs are compared in (``prediction_similarity``).

        The predictions themselves, except where they carry an arbitrary offset (classification).
        """
        return predictions


def _check_real_labels(kind: EpisodeKind, y: torch.Tensor, name: str) -> None:
    if not y.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor for kind={kind!r}; got dtype {y.dtype}")
    if y.dim() < 3:
        raise ValueError(
            f"{name} must have shape [tasks, examples, *target] (e.g. [T, N, 1]) for kind={kind!r}; "
            f"got {_shape(y)}"
        )


class Regression(EpisodeKind):
    """Real-valued targets ``[T, N, *y]`` (``[T, N, 1]`` for scalars), squared error."""

    __slots__ = ()
    discrete = False

    def validate_labels(self, y: torch.Tensor, *, name: str = "labels") -> None:
        _check_real_labels(self, y, name)

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(predictions, targets)

    def metric(self, error_scale: float = 1.0) -> Metric:
        return NormalizedError(scale=error_scale)

    def correct(
        self, predictions: torch.Tensor, targets: torch.Tensor, *, tolerance: float | None = None
    ) -> torch.Tensor:
        if tolerance is None:
            raise ValueError("kind='regression': correct() needs a tolerance on the squared error; got None")
        error = (predictions - targets).pow(2)
        return error.flatten(start_dim=error.dim() - targets.dim() + 2).mean(-1) < tolerance


class Binary(EpisodeKind):
    """Labels in {0, 1}, float ``[T, N, 1]``; predictions are logits, right when ``logit > 0`` is the label."""

    __slots__ = ()
    discrete = True

    def validate_labels(self, y: torch.Tensor, *, name: str = "labels") -> None:
        _check_real_labels(self, y, name)
        if y.shape[2:] != (1,):
            raise ValueError(f"{name} must have shape [tasks, examples, 1] for kind='binary'; got {_shape(y)}")

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(predictions, targets)

    def correct(
        self, predictions: torch.Tensor, targets: torch.Tensor, *, tolerance: float | None = None
    ) -> torch.Tensor:
        del tolerance
        right = (predictions > 0).to(targets.dtype) == targets
        return right.flatten(start_dim=right.dim() - targets.dim() + 2).all(-1)

    def probabilities(self, predictions: torch.Tensor) -> torch.Tensor:
        return predictions.sigmoid()


class Classification(EpisodeKind):
    """Integer class ids ``[T, N]`` below ``num_classes``; predictions are logits ``[T, Q, num_classes]``.

    Logits are compared as probabilities: they carry an arbitrary offset per query, and a learner
    may mask classes it cannot choose with huge negative numbers.
    """

    __slots__ = ()
    discrete = True

    def validate_labels(self, y: torch.Tensor, *, name: str = "labels") -> None:
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{name} must hold integer class ids (torch.long) for kind='classification'; got dtype {y.dtype}"
            )
        if y.dim() != 2:
            raise ValueError(f"{name} must have shape [tasks, examples] for kind='classification'; got {_shape(y)}")

    def validate_num_classes(self, num_classes: int | None, *, owner: str = "Episode") -> None:
        integer("num_classes", num_classes, owner=f"{owner} (kind='classification')", low=2)

    def prediction_shape(self, targets_shape: torch.Size, num_classes: int | None = None) -> torch.Size:
        self.validate_num_classes(num_classes)
        return torch.Size((*targets_shape, num_classes))

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(predictions.flatten(0, -2), targets.flatten())

    def correct(
        self, predictions: torch.Tensor, targets: torch.Tensor, *, tolerance: float | None = None
    ) -> torch.Tensor:
        del tolerance
        return predictions.argmax(-1) == targets

    def probabilities(self, predictions: torch.Tensor) -> torch.Tensor:
        return predictions.softmax(-1)

    def comparable(self, predictions: torch.Tensor) -> torch.Tensor:
        return self.probabilities(predictions.double())


REGRESSION = Regression("regression")
BINARY = Binary("binary")
CLASSIFICATION = Classification("classification")
KINDS: tuple[EpisodeKind, ...] = (REGRESSION, CLASSIFICATION, BINARY)
_BY_NAME = {str(kind): kind for kind in KINDS}


def episode_kind(kind: str, *, name: str = "kind") -> EpisodeKind:
    """The kind object of a name (an ``EpisodeKind`` passes through); ``name`` is the argument in errors."""
    if isinstance(kind, EpisodeKind):
        return kind
    if isinstance(kind, str) and kind in _BY_NAME:
        return _BY_NAME[kind]
    raise ValueError(f"{name} must be one of {KINDS}; got {kind!r}")


__all__ = ["Kind", "EpisodeKind", "Regression", "Binary", "Classification", "REGRESSION", "BINARY",
           "CLASSIFICATION", "KINDS", "episode_kind"]
