"""The shared contract of every exported learner and task family, in the style of timm's ``test_models.py``.

Every ``Learner`` in ``metaopt.learners.__all__`` and ``hypernets.__all__`` and every ``TaskFamily`` in
``metaopt.tasks.__all__`` is found here by itself, so a new component is tested without editing this
file. Each is built from its ``example()`` classmethod: the default is the zero-argument constructor,
and a class whose constructor needs arguments overrides it with small ones (a learner also names the
family to run on; without one it runs on a family of each of its ``kinds``). A new class that needs
arguments and gives no example fails here, saying so.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import hypernets
import metaopt.learners
import metaopt.tasks
from metaopt.analysis import key_value_parameters, query_sensitivities
from metaopt.episodes import Episode
from metaopt.learners import Capability, Example, GradientDescent, Learner, LinearSolver, provides
from metaopt.tasks import BooleanFamily, Conjunction, FewShotImages, LinearRegression, TaskFamily

NUM_TASKS = 2
ABSTRACT = (Learner, LinearSolver, TaskFamily, BooleanFamily)  # exported as bases to build on, not components
# the family a learner without one of its own runs on, for each kind it declares (and to show it a wrong kind)
FAMILY_OF_KIND: dict[str, type[TaskFamily]] = {
    "regression": LinearRegression, "binary": Conjunction, "classification": FewShotImages,
}


def exported(modules, base: type) -> list[type]:
    """The concrete subclasses of ``base`` that the modules export in ``__all__``, each once."""
    found = {getattr(module, name) for module in modules for name in module.__all__}
    classes = [c for c in found if inspect.isclass(c) and issubclass(c, base) and c not in ABSTRACT]
    return sorted(classes, key=lambda c: c.__name__)


LEARNERS = exported([metaopt.learners, hypernets], Learner)
FAMILIES = exported([metaopt.tasks], TaskFamily)


def kind_name(kind) -> str:
    """A kind's name, whether it is given as a name or as an episode-kind object (which is its name)."""
    return str(kind)


def build(cls: type):
    """``cls.example()``; a class that needs constructor arguments and gives no example fails the test."""
    try:
        return cls.example()
    except TypeError as error:
        pytest.fail(f"{cls.__name__} needs constructor arguments ({error}); give it a classmethod example() "
                    f"returning a small instance, as its base class's example() documents")
    except ImportError as error:
        pytest.skip(f"{cls.__name__}: an optional dependency is missing ({error})")


def sizes(family: TaskFamily) -> tuple[int, int]:
    """Small ``(support, query)`` sizes; N-way K-shot families take exactly their ``support_size``/``query_size``."""
    return getattr(family, "support_size", 5), getattr(family, "query_size", 3)


def sample(family: TaskFamily, seed: int = 0, generator: torch.Generator | None = None) -> Episode:
    """A tiny episode of ``family`` from ``generator`` (by default, a new one seeded with ``seed``)."""
    generator = torch.Generator().manual_seed(seed) if generator is None else generator
    return family.sample(NUM_TASKS, *sizes(family), generator=generator)


def family_of_kind(kind: str) -> TaskFamily:
    return FAMILY_OF_KIND[kind_name(kind)].example()


# ---------------------------------------------------------------------- learner cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One learner class on one family: the family its example names, or one per declared kind."""

    cls: type
    kind: str | None  # None: the example's own family

    @property
    def id(self) -> str:
        return self.cls.__name__ if self.kind is None else f"{self.cls.__name__}-{self.kind}"

    def build(self) -> tuple[Learner, TaskFamily]:
        example: Example = build(self.cls)
        assert isinstance(example, Example), f"{self.cls.__name__}.example() must return a metaopt.learners.Example"
        assert type(example.learner) is self.cls, (
            f"{self.cls.__name__}.example() built a {type(example.learner).__name__}; it must build cls(...)")
        family = example.family if example.family is not None else family_of_kind(self.kind or self.cls.kinds[0])
        return example.learner, family


def _overrides_example(cls: type) -> bool:
    """Whether the class (or a base below ``Learner``) gives its own example, which may name its family."""
    return any("example" in vars(klass) for klass in cls.__mro__ if klass is not Learner)


def learner_cases() -> list[Case]:
    cases = []
    for cls in LEARNERS:
        if _overrides_example(cls):
            cases.append(Case(cls, None))
        else:
            cases += [Case(cls, kind) for kind in cls.kinds]
    return cases


CASES = learner_cases()


def params(cases):
    return [pytest.param(case, id=case.id) for case in cases]


def prepare(case: Case) -> tuple[Learner, Episode]:
    """The case's learner (its initial weights seeded) and a tiny episode of its family."""
    torch.manual_seed(0)
    learner, family = case.build()
    return learner, sample(family)


def smaller_support_sizes(episode: Episode) -> list[int]:
    """Support sizes below the episode's to predict at: 1, except for N-way K-shot episodes (classes)."""
    return [] if episode.num_classes is not None else [1]


def test_every_exported_component_is_discovered():
    names = {c.__name__ for c in LEARNERS + FAMILIES}
    assert {"LeastSquares", "Transformer", "MAML", "HyperTransformer", "ContinualHyperTransformer"} <= names
    assert {"LinearRegression", "Conjunction", "FewShotImages", "Sinusoid"} <= names
    assert not names & {c.__name__ for c in ABSTRACT}


def test_a_class_that_needs_arguments_and_gives_no_example_fails():
    class NeedsArguments(Learner):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.width = width

    with pytest.raises(pytest.fail.Exception, match="NeedsArguments needs constructor arguments.*example"):
        build(NeedsArguments)


@pytest.mark.parametrize("case", params(CASES))
def test_predictions_have_the_query_shape(case):
    learner, episode = prepare(case)
    learner.eval()
    with torch.no_grad():
        predictions = learner(episode)
        sizes = [*smaller_support_sizes(episode), episode.num_support]
        by_size = learner.predict_by_support_size(episode, sizes)
    assert predictions.shape == episode.prediction_shape
    assert predictions.shape[:2] == (episode.num_tasks, episode.num_query)
    assert by_size.shape == (len(sizes), *episode.prediction_shape)
    torch.testing.assert_close(by_size[-1], predictions, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", params(CASES))
def test_predictions_are_deterministic(case):
    learner, episode = prepare(case)
    learner.eval()
    with torch.no_grad():
        first, again = learner(episode), learner(episode)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def _double(episode: Episode) -> Episode:
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.double() if t.is_floating_point() else t

    return episode.replace(x_support=cast(episode.x_support), y_support=cast(episode.y_support),
                           x_query=cast(episode.x_query), y_query=cast(episode.y_query),
                           x_unlabeled=None if episode.x_unlabeled is None else cast(episode.x_unlabeled))


@pytest.mark.parametrize("case", params(CASES))
def test_to_moves_every_tensor_and_comes_back(case):
    learner, episode = prepare(case)
    learner.eval()
    with torch.no_grad():
        before = learner(episode)
        learner.to(torch.float64)
        for name, tensor in [*learner.named_parameters(), *learner.named_buffers()]:
            assert not tensor.is_floating_point() or tensor.dtype == torch.float64, name
        double = learner(_double(episode))
        learner.to(torch.float32).to("cpu")
        after = learner(episode.to("cpu"))
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), before, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("case", params(CASES))
def test_loss_and_meta_gradients_are_finite(case):
    learner, episode = prepare(case)
    learner.train()
    loss = learner.loss(episode)
    assert loss.dim() == 0 and torch.isfinite(loss)
    if not learner.is_trainable:
        return
    loss.backward()
    grads = {name: p.grad for name, p in learner.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads, f"{type(learner).__name__} is trainable but its loss reaches none of its parameters"
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name


WRONG_KINDS = [pytest.param(cls, kind, id=f"{cls.__name__}-{kind}")
               for cls in LEARNERS for kind in FAMILY_OF_KIND if kind not in cls.kinds]


@pytest.mark.parametrize("cls, kind", WRONG_KINDS)
def test_an_episode_of_another_kind_is_refused(cls, kind):
    learner = build(cls).learner
    with pytest.raises(ValueError, match="kind"):
        learner(sample(family_of_kind(kind)))


# ---------------------------------------------------------------------- declared capabilities hold
def _declaring(capability: Capability) -> list[Case]:
    return [case for case in CASES if capability in case.cls.capabilities]


@pytest.mark.parametrize("case", params(_declaring(Capability.QUERY_GRADIENTS)))
def test_query_gradients_are_finite_where_declared(case):
    learner, episode = prepare(case)
    if not episode.y_query.is_floating_point():
        pytest.skip("class labels have no derivative in x_query")
    sensitivities = query_sensitivities(learner, episode, [episode.num_support])
    y_size = episode.prediction_shape[2:].numel()
    assert sensitivities.shape == (1, episode.num_tasks, episode.num_query, y_size, episode.x_query[0, 0].numel())
    assert torch.isfinite(sensitivities).all()


@pytest.mark.parametrize("case", params(_declaring(Capability.GD_CONSTRUCTION)))
def test_a_declared_gd_construction_is_gradient_descent(case):
    learner, episode = prepare(case)
    construction = learner.gd_construction(0.3)
    assert type(construction) is type(learner)
    shapes = {name: p.shape for name, p in construction.named_parameters()}
    assert shapes == {name: p.shape for name, p in learner.named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(construction(episode), GradientDescent(learner.gd_steps, 0.3)(episode),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", params(_declaring(Capability.ATTENTION_DUAL_FORM)))
def test_a_declared_attention_dual_form_exposes_keys_and_values(case):
    learner, _ = prepare(case)
    assert provides(learner, Capability.ATTENTION_DUAL_FORM) and key_value_parameters(learner)


# ---------------------------------------------------------------------- task families
FAMILY_CLASSES = [pytest.param(cls, id=cls.__name__) for cls in FAMILIES]


def make(cls: type) -> TaskFamily:
    family = build(cls)
    assert type(family) is cls, f"{cls.__name__}.example() built a {type(family).__name__}; it must build cls(...)"
    return family


def _assert_same(a: Episode, b: Episode) -> None:
    assert kind_name(a.kind) == kind_name(b.kind) and a.num_classes == b.num_classes
    for name in ("x_support", "y_support", "x_query", "y_query", "x_unlabeled"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert set(a.info) == set(b.info)
    for key in a.info:
        torch.testing.assert_close(a.info[key], b.info[key], rtol=0, atol=0, msg=f"info[{key!r}]")


@pytest.mark.parametrize("cls", FAMILY_CLASSES)
def test_family_samples_the_kind_and_shapes_it_promises(cls):
    family = make(cls)
    episode = sample(family)
    support, query = sizes(family)
    assert kind_name(episode.kind) == kind_name(family.kind)
    assert episode.x_support.shape[:2] == (NUM_TASKS, support) and episode.x_query.shape[:2] == (NUM_TASKS, query)
    assert episode.y_support.shape[:2] == (NUM_TASKS, support) and episode.y_query.shape[:2] == (NUM_TASKS, query)
    for key, value in episode.info.items():
        assert value.shape[0] == NUM_TASKS, key
    assert torch.isfinite(episode.x_support).all() and torch.isfinite(episode.x_query).all()


@pytest.mark.parametrize("cls", FAMILY_CLASSES)
def test_family_randomness_is_the_generator_only(cls):
    family = make(cls)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    torch.manual_seed(0)
    first = sample(family, generator=generator)
    generator.set_state(state)
    torch.manual_seed(1)  # the global RNG plays no part
    _assert_same(sample(family, generator=generator), first)
    _assert_same(sample(family, seed=3), first)
    other = sample(family, seed=4)
    assert not torch.equal(other.x_query, first.x_query) or not torch.equal(other.y_query, first.y_query)


@pytest.mark.parametrize("cls", FAMILY_CLASSES)
def test_family_episodes_move_and_keep_their_values(cls):
    family = make(cls)
    episode = sample(family)
    on_cpu = family.sample(NUM_TASKS, *sizes(family), generator=torch.Generator().manual_seed(0), device="cpu")
    _assert_same(on_cpu, episode)
    moved = episode.to("meta")
    assert moved.device.type == "meta" and moved.x_support.shape == episode.x_support.shape
    if torch.cuda.is_available():
        on_gpu = family.sample(NUM_TASKS, *sizes(family), generator=torch.Generator().manual_seed(0), device="cuda")
        _assert_same(on_gpu.to("cpu"), episode)
