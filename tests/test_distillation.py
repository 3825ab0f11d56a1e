"""Decentralized multi-headed distillation (Zhmoginov et al. 2023): graphs, distillation targets against a hand
computation, agents that share only public-set predictions, the batched agents, and the recipe end to end."""

import json
from types import SimpleNamespace

import pytest
import torch

from metaopt.cli import main
from metaopt.distillation import (
    AgentModels, DistillationSettings, agent_data, agent_losses, communication_graph, distillation_targets, hops,
    pipeline, public_predictions, source_heads, train_agents,
)
from metaopt.pipelines import build, load
from metaopt.testing import shrunk


@pytest.mark.parametrize("kind,degree", [("complete", None), ("ring", None), ("star", None), ("regular", 3),
                                         ("regular", 4), ("isolated", None)])
def test_graphs_are_symmetric_without_self_loops_and_have_their_degrees(kind, degree):
    adjacency = communication_graph(kind, 8, degree=degree, seed=1)
    assert adjacency.dtype == torch.bool and torch.equal(adjacency, adjacency.T)
    assert not adjacency.diagonal().any()
    degrees = adjacency.sum(1)
    expected = {"complete": [7] * 8, "ring": [2] * 8, "star": [7] + [1] * 7, "regular": [degree] * 8,
                "isolated": [0] * 8}[kind]
    assert degrees.tolist() == expected
    if kind != "isolated":
        assert (hops(adjacency) < 8).all()  # connected
    if kind == "ring":
        assert hops(adjacency)[0].tolist() == [0, 1, 2, 3, 4, 3, 2, 1]


def test_random_regular_graphs_depend_on_the_seed_and_refuse_impossible_degrees():
    assert not torch.equal(communication_graph("regular", 10, degree=3, seed=0),
                           communication_graph("regular", 10, degree=3, seed=1))
    with pytest.raises(ValueError, match="must be even"):
        communication_graph("regular", 7, degree=3)
    with pytest.raises(ValueError, match="needs degree"):
        communication_graph("regular", 8)
    with pytest.raises(ValueError, match="kind"):
        communication_graph("torus", 8)


def test_heads_distil_from_the_previous_head_of_the_neighbours():
    assert source_heads(4).tolist() == [0, 0, 1, 2]


def test_distillation_targets_equal_a_hand_computation():
    """Three agents on a path 0 - 1 - 2, two heads, two public examples, two classes."""
    probs = torch.tensor([
        [[[0.9, 0.1], [0.6, 0.4]], [[0.7, 0.3], [0.5, 0.5]]],   # agent 0: head 0, head 1
        [[[0.2, 0.8], [0.55, 0.45]], [[0.4, 0.6], [0.3, 0.7]]],  # agent 1
        [[[0.5, 0.5], [0.05, 0.95]], [[0.6, 0.4], [0.2, 0.8]]],  # agent 2
    ])
    path = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    targets, weights = distillation_targets(probs, path)
    # agent 1 reads agents 0 and 2; both heads read their main heads (head 1 reads head 0)
    # example 0: agent 0 (0.9) beats agent 2 (0.5); example 1: agent 2 (0.95) beats agent 0 (0.6)
    for head in (0, 1):
        assert torch.equal(targets[1, head, 0], probs[0, 0, 0])
        assert torch.equal(targets[1, head, 1], probs[2, 0, 1])
    # agent 1's own confidence: head 0 (0.8, 0.55), head 1 (0.6, 0.7); teachers 0.9 and 0.95 beat all of them
    assert weights[1].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    # agent 0 reads only agent 1: head 0 from agent 1's head 0 (0.8, 0.55), head 1 from it too
    assert torch.equal(targets[0, 0], probs[1, 0]) and torch.equal(targets[0, 1], probs[1, 0])
    # gate: agent 0's head 0 is 0.9 / 0.6 confident, the teacher 0.8 / 0.55: no distillation; head 1 is 0.7 / 0.5
    assert weights[0].tolist() == [[0.0, 0.0], [1.0, 1.0]]
    # agent 2 reads agent 1: head 0 (0.8 vs own 0.5: yes; 0.55 vs own 0.95: no); head 1 (0.8 vs 0.6, 0.55 vs 0.8)
    assert weights[2].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    _, ungated = distillation_targets(probs, path, confidence_gate=False)
    assert bool((ungated == 1).all())
    _, alone = distillation_targets(probs, torch.zeros(3, 3, dtype=torch.bool))
    assert bool((alone == 0).all())


def test_distillation_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    models = AgentModels(2, 3, 2, hidden=4, heads=2)
    x, y, public = torch.randn(2, 2, 3), torch.tensor([[0, 1], [1, 1]]), torch.randn(2, 1, 3)
    targets = torch.tensor([[[[0.3, 0.7]], [[0.6, 0.4]]], [[[0.5, 0.5]], [[0.1, 0.9]]]])
    weights = torch.tensor([[[1.0], [0.0]], [[1.0], [1.0]]])
    losses = agent_losses(models, x, y, public, targets, weights, nu=0.5)
    for a in range(2):
        logits = models(torch.cat([x, public], 1))[a]  # [H, 3, C]
        ce = torch.nn.functional.cross_entropy(logits[0, :2], y[a])
        soft = sum(weights[a, h, 0] * -(targets[a, h, 0] * logits[h, 2].log_softmax(-1)).sum() for h in range(2))
        torch.testing.assert_close(losses[a], ce + 0.5 * soft)


def _data(agents=4):
    return agent_data(agents=agents, num_classes=6, classes_per_agent=2, skew=0.8, per_agent=12, public=24,
                      test_per_class=4, source="digits", image_size=8, seed=0)


def test_private_data_is_skewed_disjoint_and_per_agent():
    data = agent_data(agents=4, num_classes=8, classes_per_agent=2, skew=1.0, per_agent=20, public=16,
                      test_per_class=2, source="digits", image_size=8, seed=0)
    assert data.agent_classes.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for a in range(4):
        assert set(data.private_y[a].tolist()) <= set(data.agent_classes[a].tolist())
    every = torch.cat([data.private_x.flatten(0, 1), data.public_x, data.test_x])
    assert len(every.unique(dim=0)) == len(every)  # no image is in two sets (or two agents)
    iid = agent_data(agents=4, num_classes=8, classes_per_agent=2, skew=0.0, per_agent=40, public=16,
                     test_per_class=2, source="digits", image_size=8, seed=0)
    assert len(iid.private_y[0].unique()) > 2


def test_an_agents_loss_reaches_only_its_own_weights():
    torch.manual_seed(0)
    data, models = _data(), AgentModels(4, 64, 6, hidden=8, heads=2)
    targets, weights = distillation_targets(public_predictions(models, data.public_x), communication_graph(
        "complete", 4))
    losses = agent_losses(models, data.private_x, data.private_y, data.public_x.expand(4, -1, -1), targets,
                          weights, nu=1.0)
    for name, p in models.named_parameters():
        grad = torch.autograd.grad(losses[1], p, retain_graph=True)[0]
        assert grad[1].abs().sum() > 0 and grad[[0, 2, 3]].abs().sum() == 0, name


def test_agents_exchange_only_public_set_predictions():
    """Agent 0's training changes with a neighbour's public predictions and with nothing else of theirs: not with
    their private data or labels; not at all with an agent it is not connected to (in the first round)."""
    settings = DistillationSettings(rounds=1, steps_per_round=3, batch_size=4, public_batch=8, eval_every=1)
    ring = communication_graph("ring", 4)  # agent 0 reads agents 1 and 3, not 2

    def trained(data, perturb=None):
        torch.manual_seed(0)
        models = AgentModels(4, 64, 6, hidden=8, heads=2)
        if perturb is not None:
            with torch.no_grad():
                for p in models.parameters():
                    p[perturb] += 0.5
        train_agents(models, data, ring, settings, seed=0)
        return [p[0].detach().clone() for p in models.parameters()]

    data = _data()
    reference = trained(data)
    other_private = _data().__class__(**{**data.__dict__, "private_x": data.private_x.clone(),
                                         "private_y": data.private_y.clone()})
    other_private.private_x[1:] = torch.rand_like(other_private.private_x[1:])
    other_private.private_y[1:] = (other_private.private_y[1:] + 1) % 6
    assert all(torch.equal(a, b) for a, b in zip(reference, trained(other_private)))  # their data never reaches 0
    assert all(torch.equal(a, b) for a, b in zip(reference, trained(data, perturb=2)))  # not a neighbour
    assert not all(torch.equal(a, b) for a, b in zip(reference, trained(data, perturb=1)))  # its predictions do


def test_distillation_beats_isolated_training_on_a_small_population():
    data = agent_data(agents=4, num_classes=6, classes_per_agent=2, skew=1.0, per_agent=40, public=120,
                      test_per_class=10, source="digits", image_size=8, seed=0)
    settings = DistillationSettings(rounds=12, steps_per_round=20, eval_every=12)
    results = {}
    for kind in ("isolated", "complete"):
        torch.manual_seed(0)
        history = train_agents(AgentModels(4, 64, 6, hidden=32, heads=2), data, communication_graph(kind, 4),
                               settings, seed=0)
        results[kind] = sum(history[-1]["global"]) / 4
    assert results["complete"] > results["isolated"] + 0.1


def test_recipe_runs_shrunk(tmp_path):
    assert main(["run", "decentralized_distillation", f"output_dir={tmp_path}",
                 *shrunk("decentralized_distillation")]) == 0
    (run_dir,) = (tmp_path / load("decentralized_distillation").name).iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert {"isolated", "centralized", "complete", "ring", "regular", "star"} <= set(results["runs"])
    assert len(results["claims"]) == 4
    assert (run_dir / "figures" / "accuracy_vs_round.png").is_file()


@pytest.mark.parametrize("study", [
    [],  # the auxiliary-head graph is a topology, and the run's skew one of the study's: shared runs
    ["study.topologies=[complete]"],
    ["study.skews=[0.3,0.5]"],
])
def test_the_progress_counts_every_population_trained(study, monkeypatch):
    trained = []

    def population(experiment, data, graph, heads, seed, centralized=False):
        trained.append((graph, heads, centralized))
        return [{"round": 1, "global": [0.5], "private": [0.5]}]

    monkeypatch.setattr(pipeline, "_population", population)
    monkeypatch.setattr(pipeline, "_report", lambda *args: "")
    experiment = build(load("decentralized_distillation", [*shrunk("decentralized_distillation"), *study]))
    pipeline.execute(experiment, SimpleNamespace())
    assert len(trained) == pipeline._trainings(experiment.study, experiment.data.skew)
