"""The MAML family configurations, ProtoNet and the sinusoid task family."""

import json
import math

import pytest
import torch

from metaopt.cli import main
from metaopt.pipelines import load
from metaopt.episodes import Episode
from metaopt.learners import ANIL, FOMAML, MAML, FixedInitGD, MetaSGD, ProtoNet
from metaopt.learners.maml import build_network, head_name
from metaopt.learners.protonet import prototype_logits
from metaopt.tasks import Sinusoid
from metaopt.train import MetaTrainer

SMALL_MLP = {"kind": "mlp", "in_features": 1, "hidden": [8, 8], "out_features": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def sinusoids(tasks=4, support=5, query=5, seed=0):
    return Sinusoid().sample(tasks, support, query, generator=torch.Generator().manual_seed(seed))


def test_sinusoid_ranges_and_determinism():
    episode = Sinusoid().sample(500, 10, 10, generator=torch.Generator().manual_seed(0))
    amplitude, phase = episode.info["amplitude"], episode.info["phase"]
    assert episode.kind == "regression" and episode.x_support.shape == (500, 10, 1)
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0 and amplitude.max() > 4.5
    assert 0.0 <= phase.min() and phase.max() <= math.pi and phase.max() > 3.0
    x = torch.cat([episode.x_support, episode.x_query], 1)
    assert -5.0 <= x.min() and x.max() <= 5.0 and x.min() < -4.9
    torch.testing.assert_close(episode.y_query, amplitude[:, None, None] * torch.sin(episode.x_query
                                                                                     - phase[:, None, None]))
    again = Sinusoid().sample(500, 10, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.y_support, episode.y_support)
    assert Sinusoid().error_scale == pytest.approx(torch.mean(episode.y_query ** 2).item(), rel=0.1)
    with pytest.raises(ValueError, match="amplitude"):
        Sinusoid(amplitude=(5.0, 1.0))


def test_configurations_build_from_specs():
    assert MAML(SMALL_MLP).first_order is False
    assert FOMAML(SMALL_MLP).first_order is True
    assert not FixedInitGD(SMALL_MLP).is_trainable
    assert FixedInitGD(SMALL_MLP, init="random").model[0].weight.abs().sum() > 0
    with pytest.raises(ValueError, match="kind"):
        build_network({"kind": "resnet"})
    with pytest.raises(ValueError, match="unexpected keyword"):
        build_network({"kind": "mlp", "width": 3})
    with pytest.raises(ValueError, match="init"):
        FixedInitGD(SMALL_MLP, init="meta")


def test_meta_sgd_step_sizes_receive_gradients_equal_to_higher():
    episode = sinusoids()
    grads = []
    for backend in ("func", "higher"):
        torch.manual_seed(0)
        learner = MetaSGD(SMALL_MLP, steps=2, inner_lr=0.05, backend=backend).double()
        learner.loss(episode.replace(**{k: getattr(episode, k).double()
                                        for k in ("x_support", "y_support", "x_query", "y_query")})).backward()
        step_size_grads = [p.grad for p in learner.learned_optimizer.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in step_size_grads)
        grads.append(torch.cat([p.grad.flatten() for p in learner.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_anil_adapts_only_the_head_and_meta_learns_the_body():
    torch.manual_seed(0)
    learner = ANIL(SMALL_MLP, steps=3, inner_lr=0.1)
    episode = sinusoids()
    assert head_name(learner.model) == "4" and learner.body_size == 4  # the body runs once, not per step
    adapted = learner.adapt(episode)
    assert sorted(adapted) == ["4.bias", "4.weight"]
    assert not torch.allclose(adapted["4.weight"][0], learner.model[4].weight)
    learner.loss(episode).backward()
    assert learner.model[0].weight.grad.abs().sum() > 0  # the shared body gets a meta-gradient
    reference = ANIL(SMALL_MLP, steps=3, inner_lr=0.1, backend="higher")
    reference.load_state_dict(learner.state_dict())
    reference.loss(episode).backward()
    for ours, theirs in zip(learner.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)


def test_anil_on_a_cnn_matches_higher():
    torch.manual_seed(0)
    network = {"kind": "conv4", "channels": 4, "out_features": 3, "image_size": 16}
    x = torch.randn(2, 6, 1, 16, 16, dtype=torch.float64)
    y = torch.arange(3).repeat(2, 2)
    episode = Episode(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:], kind="classification", num_classes=3)
    ours = ANIL(network, steps=2, inner_lr=0.5).double()
    reference = ANIL(network, steps=2, inner_lr=0.5, backend="higher").double()
    reference.load_state_dict(ours.state_dict())
    for learner in (ours, reference):
        learner.loss(episode).backward()
    for mine, theirs in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_protonet_logits_by_hand():
    support = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]])  # classes 0, 0, 1
    labels = torch.tensor([[0, 0, 1]])
    queries = torch.tensor([[[1.0, 1.0]]])
    logits = prototype_logits(support, labels, queries, num_classes=3)
    # prototypes: (1, 0), (0, 4), and (0, 0) for the empty class 2
    torch.testing.assert_close(logits, torch.tensor([[[-1.0, -10.0, -2.0]]]))


def test_protonet_classifies_separable_clusters():
    torch.manual_seed(0)
    centres = torch.randn(2, 3, 4) * 5  # [T, classes, features]
    labels = torch.tensor([0, 1, 2]).repeat(2, 2)  # [T, 6]
    x = centres.gather(1, labels.unsqueeze(-1).expand(-1, -1, 4)) + 0.1 * torch.randn(2, 6, 4)
    episode = Episode(x[:, :3], labels[:, :3], x[:, 3:], labels[:, 3:], kind="classification", num_classes=3)
    learner = ProtoNet(torch.nn.Identity())
    assert (learner(episode).argmax(-1) == episode.y_query).all()
    conv = ProtoNet({"kind": "conv4", "channels": 4, "out_features": None})
    images = torch.randn(2, 6, 1, 28, 28)
    logits = conv(Episode(images[:, :3], labels[:, :3], images[:, 3:], labels[:, 3:], kind="classification",
                          num_classes=3))
    assert logits.shape == (2, 3, 3) and conv.is_trainable


def test_maml_meta_training_lowers_the_query_loss_on_sinusoids():
    torch.manual_seed(0)
    learner = MAML({"kind": "mlp", "in_features": 1, "hidden": [32, 32], "out_features": 1}, steps=1, inner_lr=0.01)
    trainer = MetaTrainer(learner, Sinusoid(), steps=200, batch_size=16, support=10, query=10, lr=1e-2,
                          val_every=200, val_tasks=128, progress=False, seed=0)
    before = trainer.validate()
    result = trainer.fit()
    assert result.val_loss < 0.5 * before


@pytest.mark.parametrize("recipe", ["maml_sinusoid", "maml_digits", "maml_glyphs"])
def test_recipe_runs_end_to_end_when_shrunk(recipe, tmp_path):
    overrides = ["threads=1", "progress=false", "wandb.mode=disabled", "train.steps=2", "train.batch_size=2",
                 "train.val_every=2", "train.val_tasks=2", "train.checkpoint_every=2", "train.warmup_steps=1",
                 "compare.num_tasks=4", "compare.bootstrap=10"]
    assert main(["run", recipe, f"output_dir={tmp_path}", *overrides]) == 0
    (run_dir,) = (tmp_path / recipe).iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["curves"]) == set(load(recipe).learners)
