"""Episode kinds: losses against hand-written references, label validation, probabilities, names."""

import json
import math
import pickle

import pytest
import torch
from torch import nn

from metaopt.episodes import Episode
from metaopt.kinds import BINARY, CLASSIFICATION, KINDS, REGRESSION, EpisodeKind, episode_kind
from metaopt.learners import InnerLoop
from metaopt.metrics import Accuracy, NormalizedError
from optimizers import sgd


def _regression(t: int = 2, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(t, n, 1, generator=g), torch.randn(t, n, 1, generator=g)


def test_kinds_are_their_names_for_recipes_json_and_learner_declarations():
    assert [str(kind) for kind in KINDS] == ["regression", "classification", "binary"]
    assert REGRESSION == "regression" and hash(BINARY) == hash("binary") and "classification" in {CLASSIFICATION}
    assert CLASSIFICATION in ("binary", "classification") and REGRESSION not in ("binary",)
    assert json.dumps({"kind": BINARY}) == '{"kind": "binary"}' and f"{REGRESSION!r}" == "'regression'"
    assert pickle.loads(pickle.dumps(CLASSIFICATION)) == CLASSIFICATION
    assert type(pickle.loads(pickle.dumps(CLASSIFICATION))) is type(CLASSIFICATION)
    assert episode_kind("binary") is BINARY and episode_kind(REGRESSION) is REGRESSION
    with pytest.raises(ValueError, match=r"kind must be one of \('regression', 'classification', 'binary'\); got 'x'"):
        episode_kind("x")
    with pytest.raises(ValueError, match="task.kind must be one of"):
        episode_kind(3, name="task.kind")  # type: ignore[arg-type]


def test_an_episode_stores_the_kind_object_given_its_name():
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 1)
    episode = Episode(x, y, x, y, kind="regression")
    assert episode.kind is REGRESSION and isinstance(episode.kind, EpisodeKind)
    assert episode.replace(y_query=y + 1).kind is REGRESSION and episode.to("cpu").kind is REGRESSION
    assert Episode(x, y, x, y).kind is REGRESSION
    labels = torch.randint(0, 3, (2, 3))
    classes = Episode(x, labels, x, labels, kind="classification", num_classes=3)
    assert classes.kind is CLASSIFICATION and classes.select_tasks(slice(0, 1)).kind is CLASSIFICATION
    assert classes.prediction_shape == (2, 3, 3) and episode.prediction_shape == (2, 3, 1)


def test_regression_loss_is_the_mean_squared_error():
    predictions, targets = _regression()
    expected = sum((p - t) ** 2 for p, t in zip(predictions.flatten().tolist(), targets.flatten().tolist())) / 10
    assert REGRESSION.loss(predictions, targets).item() == pytest.approx(expected, rel=1e-6)


def test_binary_loss_is_the_cross_entropy_of_the_sigmoid():
    logits, _ = _regression()
    targets = (torch.arange(10).reshape(2, 5, 1) % 3 == 0).float()
    terms = [-(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
             for z, y in zip(logits.flatten().tolist(), targets.flatten().tolist())]
    assert BINARY.loss(logits, targets).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_classification_loss_is_the_mean_negative_log_softmax_of_the_label():
    g = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(2, 4, 3, generator=g), torch.randint(0, 3, (2, 4), generator=g)
    terms = []
    for row, label in zip(logits.reshape(-1, 3).tolist(), targets.flatten().tolist()):
        terms.append(math.log(sum(math.exp(v) for v in row)) - row[label])
    assert CLASSIFICATION.loss(logits, targets).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_losses_average_over_extra_leading_dimensions():
    logits, targets = torch.randn(3, 2, 4, 5), torch.randint(0, 5, (3, 2, 4))
    per_row = [CLASSIFICATION.loss(logits[i], targets[i]) for i in range(3)]
    torch.testing.assert_close(CLASSIFICATION.loss(logits, targets), torch.stack(per_row).mean())


def test_probabilities_and_comparable_forms():
    logits = torch.tensor([[[0.0], [2.0]]])
    torch.testing.assert_close(BINARY.probabilities(logits), torch.tensor([[[0.5], [1 / (1 + math.exp(-2))]]]))
    assert BINARY.comparable(logits) is logits and REGRESSION.comparable(logits) is logits
    classes = torch.tensor([[[0.0, math.log(3.0)]]])
    torch.testing.assert_close(CLASSIFICATION.probabilities(classes), torch.tensor([[[0.25, 0.75]]]))
    offset = CLASSIFICATION.comparable(classes + 7.0)  # an offset per query changes nothing
    assert offset.dtype == torch.float64
    torch.testing.assert_close(offset, torch.tensor([[[0.25, 0.75]]], dtype=torch.float64))
    with pytest.raises(ValueError, match="kind='regression' predictions are values, not probabilities"):
        REGRESSION.probabilities(logits)


def test_correct_decides_each_query_and_regression_needs_a_tolerance():
    targets = torch.tensor([[[1.0], [0.0], [1.0]]])
    assert BINARY.correct(torch.tensor([[[0.3], [0.2], [-1.0]]]), targets).tolist() == [[True, False, False]]
    labels = torch.tensor([[2, 0]])
    logits = torch.tensor([[[0.0, 1.0, 3.0], [0.0, 1.0, 0.5]]])
    assert CLASSIFICATION.correct(logits, labels).tolist() == [[True, False]]
    errors = torch.tensor([[[0.1], [0.6]]])
    assert REGRESSION.correct(errors, torch.zeros(1, 2, 1), tolerance=0.25).tolist() == [[True, False]]
    with pytest.raises(ValueError, match="needs a tolerance"):
        REGRESSION.correct(errors, torch.zeros(1, 2, 1))
    stacked = BINARY.correct(torch.randn(4, 1, 3, 1), targets)  # extra leading dimensions stay
    assert stacked.shape == (4, 1, 3)


def test_default_metrics():
    assert REGRESSION.metric(2.0) == NormalizedError(scale=2.0)
    assert BINARY.metric() == Accuracy() and CLASSIFICATION.metric(5.0) == Accuracy()
    assert REGRESSION.discrete is False and BINARY.discrete and CLASSIFICATION.discrete


@pytest.mark.parametrize(
    "kind, labels, fragment",
    [
        (REGRESSION, torch.ones(2, 3, 1, dtype=torch.long), "y must be a floating tensor for kind='regression'"),
        (REGRESSION, torch.ones(2, 3), "y must have shape [tasks, examples, *target]"),
        (BINARY, torch.ones(2, 3, 2), "y must have shape [tasks, examples, 1] for kind='binary'"),
        (BINARY, torch.ones(2, 3, 1, dtype=torch.int64), "y must be a floating tensor for kind='binary'"),
        (CLASSIFICATION, torch.ones(2, 3), "y must hold integer class ids (torch.long)"),
        (CLASSIFICATION, torch.ones(2, 3, 1, dtype=torch.long), "y must have shape [tasks, examples] for"),
    ],
)
def test_label_validation_names_the_field_and_the_layout(kind, labels, fragment):
    with pytest.raises(ValueError) as error:
        kind.validate_labels(labels, name="y")
    assert fragment in str(error.value)


def test_valid_labels_and_class_counts_pass():
    REGRESSION.validate_labels(torch.randn(2, 3, 4))
    BINARY.validate_labels(torch.ones(2, 3, 1))
    CLASSIFICATION.validate_labels(torch.ones(2, 3, dtype=torch.int32))
    CLASSIFICATION.validate_num_classes(2)
    REGRESSION.validate_num_classes(None)
    for bad in (None, 1, True, 3.0):
        with pytest.raises(ValueError, match=r"^Episode \(kind='classification'\): num_classes must be an int >= 2"):
            CLASSIFICATION.validate_num_classes(bad)


def test_an_inner_loop_shapes_its_outputs_as_the_kind_predicts():
    x = torch.randn(2, 3, 4)
    labels = torch.tensor([[0, 1, 1], [1, 0, 0]])  # ids a 2-output model can fit, of 3 classes
    classes = Episode(x, labels, x, labels, kind="classification", num_classes=3)
    assert InnerLoop(nn.Linear(4, 3), sgd(0.1), 1)(classes).shape == classes.prediction_shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"must output \(3,\) per query for kind='classification'"):
        InnerLoop(nn.Linear(4, 2), sgd(0.1), 1)(classes)
    values = Episode(x, torch.randn(2, 3, 1), x, torch.randn(2, 3, 1))
    assert InnerLoop(nn.Linear(4, 1), sgd(0.1), 1)(values).shape == (2, 3, 1)
