"""The shared argument checks (metaopt.checks, and the optimizers' copy) and the constructors that use them."""

import math
import pickle
import re
from functools import partial

import numpy as np
import pytest
import torch

import optimizers as O
import optimizers._checks as leaf
from hypernets import FunctionalCNN
from metaopt import checks
from metaopt.checks import ArgumentError
from metaopt.learners import InnerLoop, Lasso, LinearSelfAttention, NearestNeighbours, Ridge
from metaopt.tasks import Conjunction, LinearRegression, Majority, SparseLinear

# check -> (accepted values with what they return, refused values, the "allowed" part of the message)
NUMBER_CHECKS = {
    "positive_int": ([(1, 1), (7, 7), (np.int64(3), 3)], [0, -2, True, False, 1.0, 2.5, "3", None], "an int >= 1"),
    "non_negative_int": ([(0, 0), (5, 5)], [-1, True, False, 0.0, "0", None], "an int >= 0"),
    "positive_float": ([(0.5, 0.5), (3, 3.0), (np.float32(2), 2.0)],
                       [0, 0.0, -1.0, True, math.inf, math.nan, "1", None, torch.tensor(1.0)], "a finite number > 0"),
    "non_negative_float": ([(0, 0.0), (2.5, 2.5)], [-0.1, False, True, math.inf, math.nan, "0", None],
                           "a finite number >= 0"),
}
ONLY_HERE = {
    "probability": ([(0, 0.0), (1, 1.0), (0.3, 0.3)], [-0.1, 1.5, True, False, math.nan, "0.5", None],
                    "a probability in [0, 1]"),
    "boolean": ([(True, True), (False, False)], [0, 1, "True", None], "a bool"),
}


def _message(owner, name, allowed, value):
    return re.escape(f"{owner}: {name} must be {allowed}; got {value!r}")


@pytest.mark.parametrize("module", [checks, leaf], ids=["metaopt", "optimizers"])
@pytest.mark.parametrize("check", sorted(NUMBER_CHECKS))
def test_number_checks_accept_numbers_and_refuse_bools_other_types_and_out_of_range(module, check):
    accepted, refused, allowed = NUMBER_CHECKS[check]
    for value, expected in accepted:
        got = getattr(module, check)("n", value, owner="Thing")
        assert got == expected and type(got) is type(expected)
    for value in refused:
        with pytest.raises(ValueError, match=_message("Thing", "n", allowed, value)):
            getattr(module, check)("n", value, owner="Thing")


@pytest.mark.parametrize("check", sorted(ONLY_HERE))
def test_probability_and_boolean(check):
    accepted, refused, allowed = ONLY_HERE[check]
    for value, expected in accepted:
        assert getattr(checks, check)("p", value, owner="Thing") == expected
    for value in refused:
        with pytest.raises(ArgumentError, match=_message("Thing", "p", allowed, value)):
            getattr(checks, check)("p", value, owner="Thing")


@pytest.mark.parametrize("module", [checks, leaf], ids=["metaopt", "optimizers"])
def test_integer_with_other_bounds(module):
    assert module.integer("ways", 2, owner="Family", low=2) == 2
    for value in (1, True, 2.0):
        with pytest.raises(ValueError, match=_message("Family", "ways", "an int >= 2", value)):
            module.integer("ways", value, owner="Family", low=2)


def test_integer_in_a_range():
    assert checks.integer("k", 4, owner="X", low=1, high=4) == 4
    for value in (0, 5, True):
        with pytest.raises(ArgumentError, match=_message("X", "k", "an int in [1, 4]", value)):
            checks.integer("k", value, owner="X", low=1, high=4)


@pytest.mark.parametrize("value", [0, 1, 2, 2.5, -1, True, False, "0", None])
def test_the_optimizers_copy_decides_and_words_as_metaopt(value):
    for name in NUMBER_CHECKS:
        outcomes = []
        for module in (checks, leaf):
            try:
                outcomes.append(getattr(module, name)("x", value, owner="O"))
            except ValueError as error:
                outcomes.append(str(error))
        assert outcomes[0] == outcomes[1], name


def test_one_of():
    assert checks.one_of("kind", "b", ("a", "b"), owner="X") == "b"
    assert checks.one_of("k", 1, [1, 2], owner="X") == 1
    assert checks.one_of("flag", True, (True, None), owner="X") is True
    for value, allowed in (("c", ("a", "b")), (True, (1, 2)), (False, (0, 1)), ([1], ("a",))):
        with pytest.raises(ArgumentError, match=_message("X", "k", f"one of {tuple(allowed)!r}", value)):
            checks.one_of("k", value, allowed, owner="X")


def test_optional_allows_none_and_says_so():
    assert checks.optional(checks.positive_int, "cap", None, owner="X") is None
    assert checks.optional(checks.positive_int, "cap", 3, owner="X") == 3
    for value in (0, True):
        with pytest.raises(ArgumentError, match=_message("X", "cap", "None or an int >= 1", value)):
            checks.optional(checks.positive_int, "cap", value, owner="X")
    bounded = partial(checks.integer, low=2, high=5)
    with pytest.raises(ArgumentError, match=_message("X", "length", "None or an int in [2, 5]", 6)):
        checks.optional(bounded, "length", 6, owner="X")


def test_sequence_of_checks_every_entry_and_the_container():
    assert checks.sequence_of("lrs", [1, 0.5], checks.positive_float, owner="X") == (1.0, 0.5)
    assert checks.sequence_of("sizes", range(1, 4), checks.positive_int, owner="X", length=3) == (1, 2, 3)
    for values in ([], (), "abc", 3, None, {1: 2}, torch.ones(2)):
        with pytest.raises(ArgumentError, match=_message("X", "lrs", "a non-empty sequence", values)):
            checks.sequence_of("lrs", values, checks.positive_float, owner="X")
    with pytest.raises(ArgumentError, match=_message("X", "lrs[1]", "a finite number > 0", True)):
        checks.sequence_of("lrs", [0.1, True], checks.positive_float, owner="X")
    with pytest.raises(ArgumentError, match=_message("X", "sizes", "a sequence of 3 entries", [1, 2])):
        checks.sequence_of("sizes", [1, 2], checks.positive_int, owner="X", length=3)


def test_argument_error_is_a_value_error_that_pickles_with_its_fields():
    with pytest.raises(ArgumentError) as caught:
        checks.positive_int("k", True, owner="Lasso")
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.owner, error.name, error.allowed, error.value) == ("Lasso", "k", "an int >= 1", True)
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) == "Lasso: k must be an int >= 1; got True"


# ---------------------------------------------------------------------- constructors refuse True for an int
@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: LinearRegression(True), "LinearRegression: dim must be an int >= 1; got True"),
        (lambda: SparseLinear(4, nonzeros=True), "SparseLinear: nonzeros must be an int >= 1; got True"),
        (lambda: Conjunction(True), "Conjunction: n_bits must be an int >= 1; got True"),
        (lambda: Majority(4, p=True), r"Majority: p must be a probability in \[0, 1\]; got True"),
        (lambda: LinearRegression(3).sample(True, 4), r"LinearRegression.sample: num_tasks must be an int >= 1"),
        (lambda: Lasso(max_sweeps=True), "Lasso: max_sweeps must be an int >= 1; got True"),
        (lambda: NearestNeighbours(True), "NearestNeighbours: k must be an int >= 1; got True"),
        (lambda: Ridge(True), "Ridge: lam must be a finite number > 0; got True"),
        (lambda: LinearSelfAttention(4, layers=True), "LinearSelfAttention: layers must be an int >= 1; got True"),
        (lambda: InnerLoop(torch.nn.Linear(2, 1), O.sgd(0.1), True), "InnerLoop: steps must be an int >= 0; got True"),
        (lambda: FunctionalCNN(True), r"FunctionalCNN: widths\[0\] must be an int >= 1; got True"),
        (lambda: O.LayerwiseMixture({"w": ["w"]}, horizon=True), "LayerwiseMixture: horizon must be an int >= 1"),
        (lambda: O.AntitheticES(pairs=True), "AntitheticES: pairs must be an int >= 1; got True"),
        (lambda: O.cosine_decay_schedule(1.0, True), "cosine_decay_schedule: decay_steps must be an int >= 1"),
    ],
)
def test_constructors_refuse_true_for_a_number(build, fragment):
    with pytest.raises(ValueError, match=fragment):
        build()
