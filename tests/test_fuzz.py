"""Fuzzing the boundaries: Episode construction, every task family's constructor and ``sample``, learners at k=0.

The invariant, for every exported component: an invalid input is refused with a ``ValueError`` or
``TypeError`` whose message names the argument (or the Episode field); nothing fails with another
exception type; nothing invalid is accepted silently. Hypothesis runs derandomised (CI is deterministic)
with small example counts, so the file stays fast. ``SPECS`` lists every exported family and image source
with its valid arguments and, per argument, the invalid values to try: a new export without a spec fails
``test_every_exported_family_and_source_has_a_spec``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_contracts import CASES, params, prepare

import metaopt.tasks
from metaopt.episodes import Episode
from metaopt.tasks import (CNF, DNF, Conjunction, DecisionTree, Digits, Disjunction, FewShotImages, Glyphs,
                           ImageSource, IntegerHalfspace, Learn2LearnTasks, LinearDynamics, LinearRegression, Majority,
                           MiniImageNetFolder, NearestNeighbour, NoisyLinearRegression, OmniglotFolder, Parity,
                           ReluNet, RotatedClasses, Sinusoid, SparseDisjunction, SparseLinear, SparseParity, TaskFamily,
                           ZeroOneThreshold)

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CLEAN = (ValueError, TypeError)
HUGE = [10**13, 2**40 + 1, 2**62, 2**63 - 1]

# ---------------------------------------------------------------------- classes of bad values
NOT_INT = [1.5, 2.0, True, False, math.nan, math.inf, "3", None, [3], 3j, torch.tensor(3)]
NOT_NUMBER = [True, False, math.nan, math.inf, -math.inf, "0.5", None, [0.5], 1j, torch.tensor(0.5)]
NOT_BOOL = ["no", "yes", "False", "", 0, 1, 1.0, None, [], np.bool_(True)]
NOT_CHOICE = ["banana", "", "Normal", None, 0, True, ("normal",)]
NOT_INTERVAL = [(1, 0), (0, 0), (math.nan, 1), (0, math.inf), (-math.inf, 0), (0,), (0, 1, 2), "ab", None, 5,
                (True, 2), (False, True), {0: 1}, ("0", "1")]


def ints_below(low: int) -> st.SearchStrategy:
    return st.one_of(st.integers(max_value=low - 1), st.sampled_from(NOT_INT))


def ints_outside(low: int, high: int) -> st.SearchStrategy:
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1), st.sampled_from(NOT_INT))


def floats_below(low: float, *, inclusive: bool) -> st.SearchStrategy:
    below = st.floats(max_value=low, exclude_max=not inclusive, allow_nan=False)
    return st.one_of(below, st.sampled_from(NOT_NUMBER))


POSITIVE_INT = ints_below(1)
NON_NEGATIVE_INT = ints_below(0)
POSITIVE_FLOAT = floats_below(0.0, inclusive=True)
NON_NEGATIVE_FLOAT = floats_below(0.0, inclusive=False)
PROBABILITY = st.one_of(st.floats(max_value=0, exclude_max=True), st.floats(min_value=1, exclude_min=True),
                        st.sampled_from(NOT_NUMBER))
BOOLEAN = st.sampled_from(NOT_BOOL)


def choice(allowed: tuple[str, ...]) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(NOT_CHOICE), st.text(max_size=8).filter(lambda s: s not in allowed))


def intervals(low_bound: float | None = None) -> st.SearchStrategy:
    reversed_pairs = st.tuples(st.floats(allow_nan=False), st.floats(allow_nan=False)).filter(lambda p: p[0] >= p[1])
    cases = [st.sampled_from(NOT_INTERVAL), reversed_pairs]
    if low_bound is not None:
        cases.append(st.tuples(st.floats(max_value=low_bound, exclude_max=True, allow_nan=False),
                               st.just(low_bound + 1.0)))
    return st.one_of(*cases)


class FakeTaskset:
    """learn2learn's interface without learn2learn: ``sample()`` returns one task's ``(data, labels)``."""

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(4, 1, 8, 8), torch.arange(2).repeat(2)


def glyphs() -> Glyphs:
    return Glyphs((8, 4, 4), size=16, samples_per_class=4)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A constructor, arguments that build a small valid instance, and per argument the invalid values to try.

    ``sizes`` are valid ``sample`` sizes ``(support, query)`` (None for an image source, which has no ``sample``).
    A ``folder`` source reads its root: its arguments are checked before the folder, which these tests do not make
    (``test_image_episodes`` builds them on real layouts).
    """

    make: Callable[..., Any]
    valid: Callable[[], dict[str, Any]]
    bad: dict[str, st.SearchStrategy]
    sizes: tuple[int, int] | None = (3, 2)
    folder: bool = False

    @property
    def name(self) -> str:
        return self.make.__name__


def boolean_spec(cls: type, **extra: tuple[Any, st.SearchStrategy]) -> Spec:
    bad = {"n_bits": POSITIVE_INT, **{k: v[1] for k, v in extra.items()}}
    return Spec(cls, lambda: {"n_bits": 5, **{k: v[0] for k, v in extra.items()}}, bad, sizes=(8, 2))


TEACHING = (False, st.sampled_from(["no", "yes", "False", "", None, [], 1.5, -0.1, math.nan, math.inf, np.True_]))
"""``teaching`` is a bool or the probability of a teaching sequence per task: only other values are bad."""
MONOTONE = (False, BOOLEAN)
SPECS: list[Spec] = [
    Spec(LinearRegression, lambda: {"dim": 3}, {
        "dim": POSITIVE_INT, "noise_std": NON_NEGATIVE_FLOAT, "x_dist": choice(("normal", "uniform")),
        "x_range": intervals(), "covariance": choice(("identity", "skewed", "half_subspace")),
        "query_mode": choice(("standard", "orthogonal", "copied")), "x_scale": POSITIVE_FLOAT,
        "y_scale": POSITIVE_FLOAT, "active_dims": ints_outside(1, 3).filter(lambda v: v is not None)}),
    Spec(Sinusoid, dict, {"amplitude": intervals(low_bound=0.0), "phase": intervals(), "x_range": intervals(),
                          "noise_std": NON_NEGATIVE_FLOAT}),
    Spec(SparseLinear, lambda: {"dim": 4, "nonzeros": 2},
         {"dim": st.one_of(POSITIVE_INT, st.just(1)), "nonzeros": ints_outside(1, 4)}),
    Spec(DecisionTree, lambda: {"dim": 3, "depth": 2}, {"dim": POSITIVE_INT, "depth": ints_outside(1, 20)}),
    Spec(ReluNet, lambda: {"dim": 3, "hidden": 8}, {"dim": POSITIVE_INT, "hidden": POSITIVE_INT}),
    Spec(NoisyLinearRegression, lambda: {"dim": 3, "noise": 1.0}, {
        "dim": POSITIVE_INT,
        "noise": st.one_of(NON_NEGATIVE_FLOAT.filter(lambda v: not isinstance(v, list)),
                           st.sampled_from([[], [-1.0], [math.nan], [1.0, math.inf], [True], ["1"], "1", (None,)]))}),
    Spec(LinearDynamics, lambda: {"dim": 2}, {
        "dim": POSITIVE_INT, "length": ints_below(2).filter(lambda v: v is not None), "noise": NON_NEGATIVE_FLOAT}),
    boolean_spec(Conjunction, monotone=MONOTONE, teaching=TEACHING),
    boolean_spec(Disjunction, monotone=MONOTONE, teaching=TEACHING),
    boolean_spec(SparseDisjunction, k=(2, st.one_of(POSITIVE_INT, st.integers(min_value=6))), teaching=TEACHING),
    boolean_spec(DNF, terms=(2, POSITIVE_INT), monotone=MONOTONE, teaching=TEACHING),
    boolean_spec(CNF, clauses=(2, POSITIVE_INT), monotone=MONOTONE, teaching=TEACHING),
    boolean_spec(Majority, p=(0.3, PROBABILITY)),
    boolean_spec(ZeroOneThreshold, bound=(3, ints_outside(1, 2**24))),
    boolean_spec(IntegerHalfspace, bound=(3, ints_outside(1, 2**24))),
    boolean_spec(Parity, teaching=TEACHING),
    boolean_spec(SparseParity, k=(2, st.one_of(POSITIVE_INT, st.integers(min_value=6))), teaching=TEACHING),
    boolean_spec(NearestNeighbour, random_prefix=(10, POSITIVE_INT)),
    Spec(FewShotImages, lambda: {"source": glyphs(), "ways": 2, "shots": 1, "queries": 2, "rotations": False}, {
        "source": st.sampled_from([None, "glyphs", Glyphs, 3, FakeTaskset()]), "ways": ints_outside(2, 8),
        "shots": POSITIVE_INT, "queries": POSITIVE_INT, "split": choice(("train", "val", "test")),
        "unlabeled_per_class": NON_NEGATIVE_INT, "rotations": BOOLEAN,
        "image_size": st.sampled_from([0, -3, (0, 5), (5,), (5, 5, 5), "ab", True, 1.5, (1.5, 2), [math.nan, 4]])},
         sizes=(2, 4)),
    Spec(Learn2LearnTasks, lambda: {"taskset": FakeTaskset(), "ways": 2, "shots": 1, "queries": 1}, {
        "taskset": st.sampled_from([None, 3, "taskset", [1, 2], torch.zeros(3)]), "ways": ints_below(2),
        "shots": POSITIVE_INT, "queries": POSITIVE_INT, "unlabeled_per_class": NON_NEGATIVE_INT}, sizes=(2, 2)),
    Spec(Glyphs, lambda: {"classes": (8, 4, 4), "size": 16, "samples_per_class": 4}, {
        "classes": st.sampled_from([(0, 1, 1), (1, 1), (1, 1, 1, 1), "abc", None, (1.5, 1, 1), (True, 1, 1), 5,
                                    (-1, 2, 2), (math.nan, 1, 1)]),
        "size": ints_below(8), "seed": NON_NEGATIVE_INT, "jitter": NON_NEGATIVE_FLOAT, "pose": NON_NEGATIVE_FLOAT,
        "samples_per_class": POSITIVE_INT}, sizes=None),
    Spec(Digits, lambda: {"size": 8}, {
        "size": ints_below(8),
        "splits": st.sampled_from([{}, None, "train", [0, 1], {"train": (0, 1), "val": (2,)},
                                   {"train": (0, 1), "val": (2,), "test": (10,)},
                                   {"train": (0, 1), "val": (1,), "test": (3,)},
                                   {"train": (0, 1.5), "val": (2,), "test": (3,)},
                                   {"train": (True, 2), "val": (3,), "test": (4,)},
                                   {"train": (0, 1), "val": (), "test": (3,)},
                                   {"train": "01", "val": (2,), "test": (3,)}])}, sizes=None),
    Spec(OmniglotFolder, lambda: {"root": "."}, {
        "root": st.sampled_from([None, 3, True, b"folder", ["a"], ""]), "size": POSITIVE_INT,
        "val_alphabets": NON_NEGATIVE_INT}, sizes=None, folder=True),
    Spec(MiniImageNetFolder, lambda: {"root": "."}, {
        "root": st.sampled_from([None, 3, True, b"folder", ["a"], ""]), "size": POSITIVE_INT}, sizes=None, folder=True),
    Spec(RotatedClasses, lambda: {"source": glyphs()}, {
        "source": st.sampled_from([None, "glyphs", Glyphs, 3, FakeTaskset(), torch.zeros(1, 4, 4)])}, sizes=None),
]
SPEC = {spec.name: spec for spec in SPECS}
FAMILY_SPECS = [spec for spec in SPECS if spec.sizes is not None]


def spec_params(specs: list[Spec]) -> list:
    return [pytest.param(spec, id=spec.name) for spec in specs]


def names_argument(error: BaseException, name: str) -> bool:
    return name in str(error)


def test_every_exported_family_and_source_has_a_spec():
    exported = {getattr(metaopt.tasks, n) for n in metaopt.tasks.__all__}
    concrete = {c.__name__ for c in exported if isinstance(c, type) and issubclass(c, (TaskFamily, ImageSource))
                and not getattr(c, "__abstractmethods__", None) and c.__name__ != "BooleanFamily"}
    assert concrete == set(SPEC), f"Specs missing: {sorted(concrete - set(SPEC))}; stale: {sorted(set(SPEC) - concrete)}"


@pytest.mark.parametrize("spec", spec_params([spec for spec in SPECS if not spec.folder]))
def test_valid_arguments_build(spec):
    instance = spec.make(**spec.valid())
    if spec.sizes is not None:
        episode = instance.sample(2, *spec.sizes, generator=torch.Generator().manual_seed(0))
        episode.check_values()


# ---------------------------------------------------------------------- constructors
@pytest.mark.parametrize("spec", spec_params(SPECS))
@FUZZ
@given(data=st.data())
def test_constructor_refuses_each_bad_argument_by_name(spec, data):
    name = data.draw(st.sampled_from(sorted(spec.bad)), label="argument")
    value = data.draw(spec.bad[name], label="value")
    with pytest.raises(CLEAN) as error:
        spec.make(**(spec.valid() | {name: value}))
    assert names_argument(error.value, name), f"{spec.name}({name}={value!r}): {error.value}"


@pytest.mark.parametrize("spec", spec_params(SPECS))
def test_huge_integer_arguments_fail_cleanly_before_any_allocation(spec):
    """A huge size is refused by the constructor, or by ``sample`` before drawing (never an out-of-memory)."""
    for name, value in spec.valid().items():
        if spec.folder or not isinstance(value, int) or isinstance(value, bool):
            continue
        for huge in HUGE:
            try:
                instance = spec.make(**(spec.valid() | {name: huge}))
                if spec.sizes is not None:
                    instance.sample(2, *spec.sizes, generator=torch.Generator().manual_seed(0))
            except CLEAN as error:
                assert names_argument(error, name) or "memory" in str(error), f"{spec.name}({name}={huge}): {error}"


def test_missing_image_folders_are_refused_with_the_expected_layout(tmp_path):
    for cls in (OmniglotFolder, MiniImageNetFolder):
        with pytest.raises(FileNotFoundError, match="expected this layout"):
            cls(tmp_path / "absent")


def test_boolean_flags_are_not_read_as_truthy_strings():
    """``Conjunction(monotone="no")`` once meant monotone=True; every flag now takes only True or False."""
    for cls, flag, allowed in ((Conjunction, "monotone", "a bool"), (DNF, "monotone", "a bool"),
                               (CNF, "teaching", "a bool or a probability in [0, 1]"),
                               (Parity, "teaching", "a bool or a probability in [0, 1]")):
        with pytest.raises(ValueError, match=re.escape(f"{flag} must be {allowed}; got 'no'")):
            cls(n_bits=4, **{flag: "no"})
    with pytest.raises(ValueError, match="rotations must be a bool"):
        FewShotImages(glyphs(), ways=2, shots=1, queries=1, rotations="no")


# ---------------------------------------------------------------------- sample
@functools.cache
def family(name: str) -> TaskFamily:
    spec = SPEC[name]
    return spec.make(**spec.valid())


BAD_SIZE = {"num_tasks": ints_below(1), "support": ints_below(0), "query": ints_below(1)}


@pytest.mark.parametrize("spec", spec_params(FAMILY_SPECS))
@FUZZ
@given(data=st.data())
def test_sample_refuses_bad_and_huge_sizes_by_name(spec, data):
    support, query = spec.sizes
    sizes = {"num_tasks": 2, "support": support, "query": query}
    name = data.draw(st.sampled_from(sorted(sizes)), label="size")
    value = data.draw(st.one_of(BAD_SIZE[name], st.sampled_from(HUGE)), label="value")
    with pytest.raises(CLEAN) as error:
        family(spec.name).sample(**(sizes | {name: value}), generator=torch.Generator().manual_seed(0))
    assert names_argument(error.value, name), f"{spec.name}.sample({name}={value!r}): {error.value}"


@pytest.mark.parametrize("spec", spec_params(FAMILY_SPECS))
@FUZZ
@given(num_tasks=st.integers(1, 3), support=st.integers(0, 9), query=st.integers(1, 5))
def test_sample_at_any_small_size_gives_a_valid_episode_or_a_clean_refusal(spec, num_tasks, support, query):
    """Support 0 included: either a valid episode of exactly these sizes, or a ValueError saying why not."""
    try:
        episode = family(spec.name).sample(num_tasks, support, query, generator=torch.Generator().manual_seed(1))
    except ValueError as error:
        assert "support" in str(error) or "query" in str(error), str(error)
        return
    assert (episode.num_tasks, episode.num_support, episode.num_query) == (num_tasks, support, query)
    episode.check_values()


@pytest.mark.parametrize("generator, device, fragment", [
    ("seed", "cpu", "generator must be a torch.Generator"), (0, "cpu", "generator must be a torch.Generator"),
    (None, "banana", "device must be"), (None, 3.5, "device must be"), (None, "cuda:7", "device='cuda:7'"),
])
def test_sample_refuses_a_bad_generator_or_device(generator, device, fragment):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(CLEAN, match=fragment):
        family("LinearRegression").sample(2, 3, 2, generator=generator, device=device)


def test_sample_refuses_values_that_overflow():
    """An input scale that overflows float32 is refused when sampled, naming the family and the field."""
    with pytest.raises(ValueError, match=r"LinearRegression\(.*x_scale=1e\+300.*x_support holds NaN or inf"):
        LinearRegression(dim=3, x_scale=1e300).sample(2, 3, 2)


# ---------------------------------------------------------------------- Episode
def _valid_fields(kind: str, T: int, S: int, Q: int, x_shape: tuple[int, ...]) -> dict[str, Any]:
    fields: dict[str, Any] = {"x_support": torch.randn(T, S, *x_shape), "x_query": torch.randn(T, Q, *x_shape),
                              "kind": kind}
    if kind == "regression":
        fields |= {"y_support": torch.randn(T, S, 1), "y_query": torch.randn(T, Q, 1)}
    elif kind == "binary":
        fields |= {"y_support": torch.randint(0, 2, (T, S, 1)).float(),
                   "y_query": torch.randint(0, 2, (T, Q, 1)).float()}
    else:
        fields |= {"y_support": torch.randint(0, 3, (T, S)), "y_query": torch.randint(0, 3, (T, Q)), "num_classes": 3}
    return fields


def _retype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype)


# mutation -> (kinds it applies to, how it changes the fields, the field the refusal names)
STRUCTURAL: dict[str, tuple[tuple[str, ...], Callable[[dict], dict], str]] = {
    "x_support rank 2": (("regression", "binary", "classification"),
                         lambda f: {"x_support": f["x_support"].flatten(1)}, "x_support"),
    "x_query rank 2": (("regression", "binary", "classification"), lambda f: {"x_query": f["x_query"].flatten(1)},
                       "x_query"),
    "x_support long": (("regression", "binary", "classification"),
                       lambda f: {"x_support": _retype(f["x_support"], torch.long)}, "x_support"),
    "x_query bool": (("regression", "binary", "classification"),
                     lambda f: {"x_query": _retype(f["x_query"], torch.bool)}, "x_query"),
    "x_support complex": (("regression",), lambda f: {"x_support": _retype(f["x_support"], torch.complex64)},
                          "x_support"),
    "x_query float64": (("regression", "binary", "classification"),
                        lambda f: {"x_query": f["x_query"].double()}, "x_query"),
    "x_query feature shape": (("regression", "binary", "classification"),
                              lambda f: {"x_query": torch.randn(*f["x_query"].shape[:2], 7)}, "x_query"),
    "y_support task count": (("regression", "binary"),
                             lambda f: {"y_support": torch.zeros(f["y_support"].shape[0] + 1,
                                                                 *f["y_support"].shape[1:])}, "y_support"),
    "y_query example count": (("regression", "binary"),
                              lambda f: {"y_query": torch.zeros(f["y_query"].shape[0], f["y_query"].shape[1] + 1, 1)},
                              "y_query"),
    "y_query float64": (("regression",), lambda f: {"y_query": f["y_query"].double()}, "y_query"),
    "y regression long": (("regression",), lambda f: {"y_support": f["y_support"].long()}, "y_support"),
    "y binary two columns": (("binary",), lambda f: {"y_query": f["y_query"].expand(-1, -1, 2)}, "y_query"),
    "y classes float": (("classification",), lambda f: {"y_support": f["y_support"].float()}, "y_support"),
    "y classes rank 3": (("classification",), lambda f: {"y_query": f["y_query"][..., None]}, "y_query"),
    "num_classes None": (("classification",), lambda f: {"num_classes": None}, "num_classes"),
    "num_classes 1": (("classification",), lambda f: {"num_classes": 1}, "num_classes"),
    "num_classes bool": (("classification",), lambda f: {"num_classes": True}, "num_classes"),
    "num_classes float": (("classification",), lambda f: {"num_classes": 2.5}, "num_classes"),
    "x_unlabeled features": (("regression", "classification"),
                             lambda f: {"x_unlabeled": torch.randn(f["x_support"].shape[0], 2, 9)}, "x_unlabeled"),
    "x_unlabeled tasks": (("regression",), lambda f: {"x_unlabeled": torch.randn(f["x_support"].shape[0] + 1, 2,
                                                                                 *f["x_support"].shape[2:])},
                          "x_unlabeled"),
    "x_unlabeled long": (("regression",), lambda f: {"x_unlabeled": _retype(f["x_support"], torch.long)},
                         "x_unlabeled"),
    "info not a tensor": (("regression", "binary", "classification"), lambda f: {"info": {"w": [1.0]}}, "info['w']"),
    "info 0-dim": (("regression",), lambda f: {"info": {"w": torch.tensor(1.0)}}, "info['w']"),
    "info task count": (("regression",), lambda f: {"info": {"w": torch.zeros(f["x_support"].shape[0] + 1, 2)}},
                        "info['w']"),
    "kind unknown": (("regression",), lambda f: {"kind": "ranking"}, "kind"),
    "kind None": (("regression",), lambda f: {"kind": None}, "kind"),
    "x_support numpy": (("regression",), lambda f: {"x_support": f["x_support"].numpy()}, "x_support"),
    "y_query list": (("regression",), lambda f: {"y_query": f["y_query"].tolist()}, "y_query"),
    "x_query None": (("regression",), lambda f: {"x_query": None}, "x_query"),
}


def _poison(value: float) -> Callable[[str], Callable[[dict], dict]]:
    def at(field: str) -> Callable[[dict], dict]:
        def change(f: dict) -> dict:
            t = f[field].clone()
            t.view(-1)[-1] = value
            return {field: t}
        return change
    return at


# values that are built (the structure is right) and refused by check_values, which TaskFamily.sample runs
VALUES: dict[str, tuple[tuple[str, ...], Callable[[dict], dict], str]] = {
    **{f"{v} in {field}": (("regression", "binary", "classification") if field.startswith("x") else ("regression",),
                           _poison(v)(field), field)
       for v in (math.nan, math.inf, -math.inf) for field in ("x_support", "x_query", "y_support", "y_query")},
    "binary label 0.5": (("binary",), _poison(0.5)("y_query"), "y_query"),
    "binary label 2": (("binary",), _poison(2.0)("y_support"), "y_support"),
    "class id -1": (("classification",), _poison(-1)("y_support"), "y_support"),
    "class id = num_classes": (("classification",), _poison(3)("y_query"), "y_query"),
}


@st.composite
def episodes_with_a_fault(draw, faults: dict) -> tuple[dict, str, str]:
    name = draw(st.sampled_from(sorted(faults)), label="fault")
    kinds, change, field = faults[name]
    kind = draw(st.sampled_from(kinds))
    T, S, Q = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    x_shape = draw(st.sampled_from([(2,), (3,), (1, 2, 2)]))
    fields = _valid_fields(kind, T, S, Q, x_shape)
    return fields | change(fields), name, field


@FUZZ
@given(kind=st.sampled_from(["regression", "binary", "classification"]), T=st.integers(0, 3), S=st.integers(0, 4),
       Q=st.integers(1, 3), x_shape=st.sampled_from([(1,), (4,), (1, 3, 3)]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_a_well_formed_episode_builds_and_passes_its_value_check(kind, T, S, Q, x_shape, dtype):
    fields = _valid_fields(kind, T, S, Q, x_shape)
    fields["x_support"], fields["x_query"] = fields["x_support"].to(dtype), fields["x_query"].to(dtype)
    episode = Episode(**fields)
    episode.check_values()
    assert episode.take_support(0).num_support == 0 and episode.take_support(S).num_support == S


@settings(FUZZ, max_examples=80)
@given(case=episodes_with_a_fault(STRUCTURAL))
def test_a_malformed_episode_is_refused_naming_the_field(case):
    fields, name, field = case
    with pytest.raises(ValueError) as error:
        Episode(**fields)
    assert field in str(error.value), f"{name}: {error.value}"


@settings(FUZZ, max_examples=40)
@given(case=episodes_with_a_fault(VALUES))
def test_bad_values_are_built_but_refused_by_check_values_naming_the_field(case):
    """Construction reads no values (see the Episode docstring); ``check_values``, run by every ``sample``, does."""
    fields, name, field = case
    episode = Episode(**fields)
    with pytest.raises(ValueError) as error:
        episode.check_values()
    assert f"Episode.{field}" in str(error.value), f"{name}: {error.value}"


@pytest.mark.parametrize("k", [-1, 5, 1.0, True, "1", None, torch.tensor(1)])
def test_take_support_refuses_what_is_not_an_int_in_range(k):
    episode = Episode(**_valid_fields("regression", 2, 4, 2, (3,)))
    with pytest.raises(ValueError, match="take_support"):
        episode.take_support(k)


# ---------------------------------------------------------------------- learners at k = 0
@functools.cache
def prepared(case_id: str):
    learner, episode = prepare(next(c for c in CASES if c.id == case_id))
    return learner.eval(), episode


def _zero_support_outcome(fn: Callable[[], torch.Tensor], shape: torch.Size) -> None:
    try:
        with torch.no_grad():
            predictions = fn()
    except ValueError as error:
        assert "support" in str(error), str(error)
        return
    assert predictions.shape == shape
    assert torch.isfinite(predictions).all(), "a prediction from no support examples must be defined (e.g. the prior)"


@pytest.mark.parametrize("case", params(CASES))
def test_every_learner_at_zero_support_examples_predicts_or_refuses_cleanly(case):
    learner, episode = prepared(case.id)
    _zero_support_outcome(lambda: learner(episode.take_support(0)), episode.prediction_shape)
    _zero_support_outcome(lambda: learner.predict_by_support_size(episode, [0, episode.num_support]),
                          torch.Size((2, *episode.prediction_shape)))


BAD_SUPPORT_SIZES = [[], None, "1", 3, [1.5], [True], [None], [torch.tensor(1)], ["0"], [0, "1"]]


@settings(FUZZ, max_examples=60)
@given(case_id=st.sampled_from([c.id for c in CASES]), data=st.data())
def test_predict_by_support_size_refuses_bad_sizes_by_name(case_id, data):
    """Sizes must be a non-empty sequence of ints in [0, num_support]; every learner refuses the rest the same way."""
    learner, episode = prepared(case_id)
    out_of_range = st.lists(st.integers(), min_size=1, max_size=3).filter(
        lambda s: any(not 0 <= k <= episode.num_support for k in s))
    sizes = data.draw(st.one_of(st.sampled_from(BAD_SUPPORT_SIZES), out_of_range), label="support_sizes")
    with pytest.raises(CLEAN) as error, torch.no_grad():
        learner.predict_by_support_size(episode, sizes)
    assert "support_sizes" in str(error.value), str(error.value)
