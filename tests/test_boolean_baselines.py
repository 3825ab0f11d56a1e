"""Boolean baselines: exact recovery by the elimination learners, references for the rest."""

import pytest
import torch

from conftest import generator
from metaopt.learners.boolean_baselines import (
    BooleanAveraging, BooleanMLP, BooleanNearestNeighbours, Elimination, GF2Elimination, Null, gf2_solve,
)
from metaopt.metrics import Accuracy
from metaopt.tasks import Conjunction, Disjunction, LinearRegression, Parity, SparseParity

BASELINES = {
    "null": Null,
    "averaging": BooleanAveraging,
    "1nn": lambda: BooleanNearestNeighbours(1),
    "3nn_cosine": lambda: BooleanNearestNeighbours(3, metric="cosine"),
    "elimination": Elimination,
    "gf2": GF2Elimination,
    "mlp": lambda: BooleanMLP(hidden=8, steps=5),
}


def accuracy(learner, episode) -> float:
    with torch.no_grad():
        return Accuracy().per_task(learner(episode), episode).mean().item()


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("support", [0, 1, 7])
def test_logits_have_query_shape_for_any_support(name, support):
    learner = BASELINES[name]()
    ep = Conjunction(5).sample(4, support, 3, generator=generator())
    out = learner(ep)
    assert out.shape == (4, 3, 1) and torch.isfinite(out).all()
    assert torch.equal(out, learner(ep))  # deterministic (the MLP's initialisation is seeded)
    assert learner.kinds == ("binary",) and not learner.is_trainable


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_regression_episodes_are_refused(name):
    with pytest.raises(ValueError, match="handles episodes of kind"):
        BASELINES[name]()(LinearRegression(3).sample(2, 4))


def test_elimination_recovers_a_conjunction_from_its_teaching_sequence():
    n = 8
    ep = Conjunction(n, teaching=True).sample(200, n + 2, 64, generator=generator(1))
    learner = Elimination()
    for t in range(ep.num_tasks):  # only the teaching prefix is given
        L = int(ep.info["teaching_length"][t])
        literals = learner.hypothesis(ep.x_support[t : t + 1, :L], ep.y_support[t : t + 1, :L, 0])[0]
        true = ep.info["literals"][t, 0]
        assert torch.equal(literals[0], true == 1) and torch.equal(literals[1], true == -1)
    assert accuracy(learner, ep) == 1.0


def test_elimination_learns_disjunctions_by_duality_and_conjunctions_from_random_points():
    ep = Disjunction(8, teaching=True).sample(100, 10, 64, generator=generator(2))
    assert accuracy(Elimination("disjunction"), ep) == 1.0
    ep = Conjunction(6).sample(300, 60, 16, generator=generator(3))
    assert accuracy(Elimination(), ep) > 0.99  # consistent hypotheses err only on unseen corners
    assert accuracy(Elimination(), ep.take_support(0)) < 0.8  # with no positive seen it predicts 0


def test_gf2_elimination_recovers_a_parity_from_n_independent_examples():
    n = 10
    family = Parity(n)
    ep = family.sample(300, 3 * n, 32, generator=generator(4))
    bits = ep.x_support > 0
    subset, rank = gf2_solve(bits[:, :n], ep.y_support[:, :n, 0] > 0.5)
    full = rank == n  # the first n examples are independent for most tasks
    assert full.float().mean() > 0.2
    assert torch.equal(subset[full], ep.info["subset"][full].bool())
    # enough random examples span {0,1}^n for almost every task; the teaching sequence always does
    assert accuracy(GF2Elimination(), ep) > 0.98
    teaching = Parity(n, teaching=True).sample(50, n, 32, generator=generator(5))
    assert torch.equal(GF2Elimination().fit(teaching.x_support, teaching.y_support[..., 0]),
                       teaching.info["subset"].bool())
    assert accuracy(GF2Elimination(), teaching) == 1.0


def test_gf2_solve_matches_a_reference_and_reports_rank():
    g = generator(6)
    a = torch.rand(40, 6, 5, generator=g) < 0.5
    s_true = torch.rand(40, 5, generator=g) < 0.5
    b = (a.float() @ s_true.float()[..., None])[..., 0].remainder(2) == 1
    s, rank = gf2_solve(a, b)
    assert torch.equal((a.float() @ s.float()[..., None])[..., 0].remainder(2) == 1, b)  # s solves the system
    assert rank.tolist() == [_gf2_rank(a[t]) for t in range(40)]


def _gf2_rank(rows: torch.Tensor) -> int:
    """Rank over GF(2) by the textbook loop on rows read as binary numbers (an XOR basis)."""
    basis: list[int] = []
    for row in rows.int().tolist():
        value = int("".join(map(str, row)), 2)
        for b in basis:
            value = min(value, value ^ b)
        if value:
            basis = sorted(basis + [value], reverse=True)
    return len(basis)


def test_sparse_parity_is_learnt_by_gf2_not_by_averaging():
    ep = SparseParity(10, k=2).sample(300, 40, 16, generator=generator(7))
    assert accuracy(GF2Elimination(), ep) > 0.98
    assert abs(accuracy(BooleanAveraging(), ep) - 0.5) < 0.05


def _knn_reference(xs, ys, xq, k, metric):
    """k-NN one query at a time: sort by distance with ties broken by position, vote, 0 on a tie."""
    out = torch.zeros(xq.shape[:2])
    for t in range(xs.shape[0]):
        for q in range(xq.shape[1]):
            if metric == "hamming":
                dist = [(xs[t, s] != xq[t, q]).sum().item() for s in range(xs.shape[1])]
            else:
                dist = [-torch.nn.functional.cosine_similarity(xs[t, s], xq[t, q], dim=0).item()
                        for s in range(xs.shape[1])]
            nearest = sorted(range(xs.shape[1]), key=lambda s: (dist[s], s))[:k]
            out[t, q] = float(sum(ys[t, s].item() for s in nearest) / len(nearest) > 0.5)
    return out


@pytest.mark.parametrize("k, metric", [(1, "hamming"), (3, "hamming"), (2, "cosine"), (5, "cosine")])
def test_nearest_neighbours_against_a_slow_loop(k, metric):
    ep = Conjunction(4).sample(6, 9, 5, generator=generator(8))  # n = 4: many ties
    logits = BooleanNearestNeighbours(k, metric)(ep)[..., 0]
    reference = _knn_reference(ep.x_support, ep.y_support[..., 0], ep.x_query, k, metric)
    assert torch.equal((logits > 0).float(), reference)


def test_cosine_handles_real_valued_inputs():
    xs = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    learner = BooleanNearestNeighbours(1, metric="cosine")
    logits = learner.predict(xs, torch.tensor([[1.0, 0.0]]), torch.tensor([[[5.0, 0.1], [0.1, 0.2]]]))
    assert (logits > 0).tolist() == [[True, False]]


def test_null_predicts_the_majority_label_and_averaging_the_sign_of_the_mean():
    xs = torch.tensor([[[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]])
    ys = torch.tensor([[1.0, 1.0, 0.0]])
    xq = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])
    assert (Null().predict(xs, ys, xq) > 0).all()
    w = torch.tensor([1 + 1 + 1, 1 - 1 - 1]) / 3  # mean of (2y − 1) x
    torch.testing.assert_close(BooleanAveraging().predict(xs, ys, xq)[0], xq[0] @ w)


def test_mlp_fits_its_support_and_generalises_on_conjunctions():
    ep = Conjunction(6).sample(32, 40, 24, generator=generator(9))
    mlp = BooleanMLP(hidden=16, steps=60, lr=0.05)
    both = ep.replace(x_query=torch.cat([ep.x_support, ep.x_query], 1), y_query=torch.cat([ep.y_support, ep.y_query], 1))
    correct = ((mlp(both) > 0).float() == both.y_query)[..., 0]
    assert correct[:, :40].float().mean() > 0.97  # fits the support
    assert correct[:, 40:].float().mean() > 0.85  # and generalises


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: BooleanNearestNeighbours(0), "k must be an int >= 1"),
        (lambda: BooleanNearestNeighbours(1, metric="euclid"), "metric must be one of"),
        (lambda: Elimination("dnf"), "target must be one of"),
        (lambda: BooleanMLP(hidden=0), "hidden must be an int >= 1"),
        (lambda: BooleanMLP(lr=0), "lr must be a finite number > 0"),
    ],
)
def test_invalid_parameters_are_refused(build, fragment):
    with pytest.raises(ValueError, match=fragment):
        build()
