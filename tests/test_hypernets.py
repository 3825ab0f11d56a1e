"""hypernets/: the target CNN, the HyperTransformer and the continual HyperTransformer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hypernets import FunctionalCNN, HyperTransformer, TargetCNN
from metaopt.episodes import Episode
from metaopt.learners import ANIL, MAML
from metaopt.learners import task_folding
from metaopt.learners.task_folding import fold, folded_conv, unfold

WAYS = 3
nan = float("nan")


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def image_episode(num_tasks: int = 2, ways: int = WAYS, shots: int = 2, queries: int = 2, unlabeled: int = 0,
                  size: int = 16, seed: int = 0) -> Episode:
    """Random images in the FewShotImages layout: ``shots`` blocks of every class once, then queries."""
    g = torch.Generator().manual_seed(seed)
    y_support = torch.stack([torch.randperm(ways, generator=g) for _ in range(num_tasks * shots)]).view(num_tasks, -1)
    y_query = torch.arange(ways).repeat(queries).expand(num_tasks, -1)
    rand = lambda n: torch.rand(num_tasks, n, 1, size, size, generator=g)  # noqa: E731
    return Episode(rand(ways * shots), y_support, rand(ways * queries), y_query.clone(), kind="classification",
                   x_unlabeled=rand(unlabeled) if unlabeled else None, num_classes=ways)


# ---------------------------------------------------------------------- FunctionalCNN
@pytest.mark.parametrize("widths", [4, 8, [4, 8, 16, 32]])
def test_cnn_shapes_have_a_leading_task_dimension(widths):
    cnn = FunctionalCNN(widths, num_classes=WAYS, image_size=16)
    params = {k: v.expand(3, *v.shape) for k, v in cnn.init_params().items()}
    cnn.check_params(params, 3)
    assert cnn(params, torch.rand(3, 7, 1, 16, 16)).shape == (3, 7, WAYS)
    assert params["logits_weight"].shape == (3, WAYS, cnn.feature_size)


def test_cnn_strategies_agree_and_match_a_per_task_module():
    cnn = FunctionalCNN([4, 6, 8, 8], num_classes=WAYS, image_size=16)
    params = {k: torch.randn(2, *v.shape) * 0.3 for k, v in cnn.init_params().items()}
    x = torch.rand(2, 5, 1, 16, 16)
    outputs = {}
    for strategy in ("folded", "batched", "vmap", "loop"):
        cnn.strategy = strategy
        outputs[strategy] = cnn(params, x, norm_examples=3)
    torch.testing.assert_close(outputs["folded"], outputs["loop"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["batched"], outputs["loop"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["vmap"], outputs["loop"], rtol=1e-4, atol=1e-5)
    # an independent nn.Sequential reference on task 1, statistics from the whole batch
    ref = nn.Sequential(*[m for i, c in enumerate([1, 4, 6, 8]) for m in (
        nn.Conv2d(c, [4, 6, 8, 8][i], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.BatchNorm2d([4, 6, 8, 8][i], track_running_stats=False))], nn.Flatten(), nn.Linear(8, WAYS))
    with torch.no_grad():
        for i in range(4):
            ref[4 * i].weight.copy_(params[f"conv{i}_weight"][1])
            ref[4 * i].bias.copy_(params[f"conv{i}_bias"][1])
        ref[-1].weight.copy_(params["logits_weight"][1])
        ref[-1].bias.copy_(params["logits_bias"][1])
    torch.testing.assert_close(cnn(params, x)[1], ref(x[1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shared", [False, True])
def test_folded_conv_without_gradients_equals_the_grouped_convolution(tasks, stride, shared):
    """One task without autograd runs torch's native kernel, several a grouped oneDNN conv: same numbers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tasks, 4, 2, 9, 9, generator=g)
    weight = torch.randn(*(() if shared else (tasks,)), 3, 2, 3, 3, generator=g)
    bias = torch.randn(*(() if shared else (tasks,)), 3, generator=g)
    with torch.no_grad():
        fast = unfold(folded_conv(fold(x, channels_last=True), weight, bias, stride=stride, padding=1))
    per_task = [torch.nn.functional.conv2d(x[t], weight if shared else weight[t], bias if shared else bias[t],
                                           stride=stride, padding=1) for t in range(tasks)]
    torch.testing.assert_close(fast, torch.stack(per_task), rtol=1e-5, atol=1e-5)


def test_cnn_refuses_bad_widths_and_params():
    with pytest.raises(ValueError, match="widths"):
        FunctionalCNN([8, 8])
    cnn = FunctionalCNN(4, image_size=16)
    with pytest.raises(ValueError, match="conv0_weight"):
        cnn.check_params({}, 2)


def test_target_cnn_is_the_same_network_as_a_module():
    module = TargetCNN(4, num_classes=WAYS, image_size=16)
    x = torch.rand(5, 1, 16, 16)
    layers = {f"conv{i}": module[i][0] for i in range(4)} | {"logits": module[4][1]}
    params = {f"{name}_{kind}": getattr(layer, kind).unsqueeze(0)
              for name, layer in layers.items() for kind in ("weight", "bias")}
    torch.testing.assert_close(module(x), FunctionalCNN(4, num_classes=WAYS, image_size=16)(params, x.unsqueeze(0))[0])
    assert TargetCNN(4, num_classes=None, image_size=16)(x).shape == (5, 4)


@pytest.mark.parametrize("learner", [MAML, ANIL])
def test_maml_and_anil_on_the_target_cnn_fold_the_tasks_with_the_reference_meta_gradient(learner, monkeypatch):
    """TargetCNN is an ordinary module of foldable layers: the inner loop's auto strategy folds it, and the
    meta-gradient equals a loop over tasks and higher's (float64)."""
    calls = []
    folded_call = task_folding.folded_call
    monkeypatch.setattr(task_folding, "folded_call", lambda *args, **kw: calls.append(1) or folded_call(*args, **kw))
    network = TargetCNN(4, num_classes=WAYS, image_size=16).double()
    episode = image_episode(num_tasks=2)
    episode = episode.replace(x_support=episode.x_support.double(), x_query=episode.x_query.double())
    grads = {}
    for name, settings in {"folded": {}, "loop": {"strategy": "loop"}, "higher": {"backend": "higher"}}.items():
        maml = learner(network, steps=2, inner_lr=0.5, **settings)
        weights = [p for p in maml.parameters() if p.requires_grad]
        grads[name] = torch.autograd.grad(maml.loss(episode), weights)
        if name == "folded":
            assert maml.resolved_strategy() == "folded" and calls, "the inner loop did not fold the tasks"
    for name in ("loop", "higher"):
        for ours, theirs in zip(grads["folded"], grads[name]):
            torch.testing.assert_close(ours, theirs)


# ---------------------------------------------------------------------- HyperTransformer
def small_ht(**overrides) -> HyperTransformer:
    settings = dict(num_classes=WAYS, widths=4, image_size=16, label_dim=8, image_dim=8, activation_dim=8,
                    embedder_channels=4)
    return HyperTransformer(**(settings | overrides))


@pytest.mark.parametrize("widths", [4, 8, [4, 8, 8, 16]])
@pytest.mark.parametrize("generate", ["all", "logits"])
def test_ht_generates_weights_of_every_width_with_a_task_dimension(widths, generate):
    ht = small_ht(widths=widths, generate=generate)
    episode = image_episode(num_tasks=3)
    params = ht.generate(episode)
    ht.cnn.check_params(params, 3)
    assert ht(episode).shape == (3, episode.num_query, WAYS)
    assert ("conv0_weight" in ht.generator.shared) == (generate == "logits")
    assert "logits_weight" not in ht.generator.shared  # the logits layer is always generated


def test_reordering_the_support_set_leaves_the_weights_unchanged():
    ht = small_ht(n_layer=2).eval()
    episode = image_episode(num_tasks=2, shots=2)
    order = torch.randperm(episode.num_support)
    shuffled = episode.replace(x_support=episode.x_support[:, order], y_support=episode.y_support[:, order])
    with torch.no_grad():
        a, b = ht.generate(episode), ht.generate(shuffled)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ht(episode), ht(shuffled), rtol=1e-4, atol=1e-5)


def test_masked_unlabeled_tokens_change_nothing():
    ht = small_ht(n_layer=2).eval()
    with_unlabeled = image_episode(num_tasks=2, unlabeled=4)
    without = with_unlabeled.replace(x_unlabeled=None)
    hidden = torch.zeros(2, 4, dtype=torch.bool)
    with torch.no_grad():
        masked, plain, seen = ht.generate(with_unlabeled, hidden), ht.generate(without), ht.generate(with_unlabeled)
        for name in plain:
            torch.testing.assert_close(masked[name], plain[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ht(with_unlabeled, hidden), ht(without), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen["logits_weight"], plain["logits_weight"])


def test_a_hand_set_attention_layer_generates_the_prototype_logits_weights():
    """One attention layer whose placeholder k averages the final features of the support images of class k.

    Tokens are [one-hot label (WAYS+1) ; image part (1) ; final CNN features (F)]. The placeholder of class k
    queries its one-hot label and a placeholder flag; support keys are their one-hot labels, placeholder keys
    −β times the flag, so placeholder k attends (to within e^−β) only to the support images of class k and
    reads their features as values: its output, and the head's weight row k, is the class mean (the
    prototype of Snell et al.), which ProtoNet's logits 2⟨c_k, f⟩ − ‖c_k‖² use as weights.
    """
    width = 6
    ht = HyperTransformer(WAYS, width, image_size=16, generate="logits", n_layer=1, n_head=1, label_dim=WAYS + 1,
                          image_dim=1, activation_dim=width, embedder_channels=2, layer_norm=False)
    gen, lab = ht.generator.generators["logits"], WAYS + 1
    n, flag, feats = lab + 1 + width, lab, slice(lab + 1, lab + 1 + width)
    beta = 60.0 * math.sqrt(n)  # scaled_dot_product_attention divides scores by sqrt(n)
    with torch.no_grad():
        for p in gen.parameters():
            p.zero_()
        ht.generator.labels.weight.copy_(torch.eye(lab))
        ht.generator.embedder.proj.weight.zero_()
        ht.generator.embedder.proj.bias.zero_()  # support tokens: image part 0
        gen.placeholders[:, flag] = 1.0  # placeholders: flag 1, features 0 (labels added from the table)
        gen.activation_features.net.weight.copy_(torch.eye(width))
        q, k, v = gen.encoder.blocks[0].attn.qkv.weight.split(n)
        q[:lab, :lab] = beta * torch.eye(lab)
        q[flag, flag] = 1.0
        k[:lab, :lab] = torch.eye(lab)
        k[flag, flag] = -beta
        v[feats, feats] = torch.eye(width)
        gen.encoder.blocks[0].attn.proj.weight.copy_(torch.eye(n))
        gen.head.weight[:width, feats] = torch.eye(width)
    episode = image_episode(num_tasks=2, shots=3)
    with torch.no_grad():
        params = ht.generate(episode)
        features = ht.cnn.features(params, episode.x_support, norm_examples=episode.num_support)  # [T, S, F]
    one_hot = nn.functional.one_hot(episode.y_support, WAYS).float()
    prototypes = one_hot.transpose(1, 2) @ features / one_hot.sum(1).unsqueeze(-1)
    torch.testing.assert_close(params["logits_weight"], prototypes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(params["logits_bias"], torch.zeros(2, WAYS))


def reference_weights(generator, x_tokens, labels, num_labeled, token_mask=None, previous=None):
    """``WeightGenerator``'s weights as first formulated: task by task, every token through every ``Block``."""
    tasks = []
    for t in range(labels.shape[0]):
        h = fold(x_tokens[t:t + 1], channels_last=True)
        label_tokens, image_features = generator.labels(labels[t:t + 1]), generator.embedder(h)
        params = {}
        for index, layer in enumerate(generator.cnn.layers):
            if layer.name in generator.generators:
                gen = generator.generators[layer.name]
                support = torch.cat([label_tokens, image_features, gen.activation_features(h)], dim=-1)
                placeholders = gen.placeholders.expand(1, -1, -1)
                if gen.label_placeholders:
                    labels_part = generator.labels.weight[:layer.out_channels]
                    placeholders = placeholders + nn.functional.pad(labels_part, (0, placeholders.shape[-1]
                                                                                  - gen.label_dim))
                tokens = [support]
                if previous is not None:
                    prev = layer.to_slices({k: v[t:t + 1] for k, v in previous.items()})
                    tokens.append(gen.weight_tokens(prev) + gen.placeholders)
                x = torch.cat([*tokens, placeholders], dim=1)
                mask = None
                if token_mask is not None:
                    mask = torch.cat([token_mask[t:t + 1], token_mask.new_ones(1, x.shape[1] - labels.shape[1])], 1)
                    mask = mask[:, None, None, :]
                for block in gen.encoder.blocks:
                    x = block(x, mask)
                params.update(layer.from_slices(gen.head(gen.encoder.ln_f(x)[:, -layer.out_channels:])))
            else:
                for key in (f"{layer.name}_weight", f"{layer.name}_bias"):
                    params[key] = generator.shared[key].unsqueeze(0)
            h = generator.cnn.folded_block(index, params, h, norm_examples=num_labeled)
        tasks.append(params)
    return {name: torch.cat([p[name] for p in tasks]) for name in tasks[0]}


@pytest.mark.parametrize("n_layer, generate, masked, feedback", [
    (1, "all", False, False), (2, "all", True, False), (1, "logits", True, False), (2, "all", False, True),
    (1, "all", True, True)])
def test_generated_weights_and_gradients_match_the_per_task_reference(n_layer, generate, masked, feedback):
    """The batched encoder (placeholders projected once, the last block attending from them only) is exact."""
    from hypernets import WeightGenerator

    cnn = FunctionalCNN([4, 6, 4, 8], num_classes=WAYS, image_size=16)
    generator = WeightGenerator(cnn, WAYS, generate=generate, n_layer=n_layer, label_dim=8, image_dim=8,
                                activation_dim=8, embedder_channels=4, feedback=feedback).double()
    episode = image_episode(num_tasks=3, shots=2, unlabeled=2)
    x = torch.cat([episode.x_support, episode.x_unlabeled], dim=1).double()
    labels = torch.cat([episode.y_support, torch.full((3, 2), WAYS)], dim=1)
    mask = torch.tensor([[True] * 6 + [True, False], [True] * 6 + [False, False], [True] * 8]) if masked else None
    previous = None
    if feedback:
        previous = {k: torch.randn(3, *v, dtype=torch.float64) for k, v in cnn.param_shapes().items()}
    weights = {k: torch.randn(3, *v, dtype=torch.float64) for k, v in cnn.param_shapes().items()}
    results = []
    for fn in (lambda: generator(x, labels, 6, token_mask=mask, previous=previous)[0],
               lambda: reference_weights(generator, x, labels, 6, mask, previous)):
        generator.zero_grad()
        params = fn()
        sum((params[k] * weights[k]).sum() for k in weights).backward()
        results.append((params, {n: p.grad.clone() for n, p in generator.named_parameters() if p.grad is not None}))
    (params, grads), (ref_params, ref_grads) = results
    assert params.keys() == ref_params.keys() and grads.keys() == ref_grads.keys()
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12)
    if masked:  # the reference's mask matters, so the test sees a broken mask
        unmasked = reference_weights(generator, x, labels, 6, None, previous)
        assert not torch.allclose(unmasked["logits_weight"], ref_params["logits_weight"])


def test_ht_refuses_wrong_ways_and_empty_support():
    ht = small_ht()
    with pytest.raises(ValueError, match="num_classes"):
        ht(image_episode(ways=4))
    with pytest.raises(ValueError, match="at least one labelled"):
        ht(image_episode().take_support(0))
    with pytest.raises(ValueError, match="n_head"):
        small_ht(n_head=5)
    with pytest.raises(ValueError, match="generate"):
        small_ht(generate="some")


def test_a_short_meta_training_run_lowers_the_loss():
    from metaopt.tasks import FewShotImages, Glyphs
    from metaopt.train import MetaTrainer

    family = FewShotImages(Glyphs(), ways=WAYS, shots=1, queries=3, image_size=16)
    ht = small_ht(widths=4)
    trainer = MetaTrainer(ht, family, steps=40, batch_size=8, support=family.support_size, query=family.query_size,
                          lr=3e-3, val_every=40, val_tasks=64, log_every=40, progress=False)
    before = trainer.validate()
    result = trainer.fit()
    assert result.val_loss < before - 0.05, (before, result.val_loss)


# ---------------------------------------------------------------------- continual HyperTransformer
def small_cht(**overrides):
    from hypernets import ContinualHyperTransformer

    settings = dict(ways=WAYS, widths=4, embedding_dim=8, image_size=16, label_dim=8, image_dim=8, activation_dim=8,
                    embedder_channels=4)
    return ContinualHyperTransformer(**(settings | overrides))


def test_split_tasks_relabels_each_task_and_keeps_its_images():
    from hypernets import split_tasks

    episode = image_episode(num_tasks=2, ways=2 * WAYS, shots=2, queries=2)
    tasks = split_tasks(episode, WAYS)
    assert len(tasks) == 2 and all(t.num_classes == WAYS for t in tasks)
    for tau, task in enumerate(tasks):
        assert task.num_support == 2 * WAYS and task.num_query == 2 * WAYS
        assert int(task.y_support.max()) == WAYS - 1
        first = (episode.y_support[0] // WAYS == tau).nonzero()[0, 0]
        torch.testing.assert_close(task.x_support[0, 0], episode.x_support[0, first])
    pieces = split_tasks(image_episode(ways=WAYS, shots=4), WAYS, "mini_batch", shots=2)
    assert [p.num_support for p in pieces] == [2 * WAYS, 2 * WAYS]


def test_cht_recursion_carries_state_from_the_previous_task():
    """θ_2 depends on task 1's support with feedback, and not without it."""
    episode = image_episode(num_tasks=2, ways=2 * WAYS, shots=1)
    changed = episode.replace(x_support=torch.where(episode.y_support[..., None, None, None] < WAYS,
                                                    torch.rand_like(episode.x_support), episode.x_support))
    for feedback in (True, False):
        cht = small_cht(feedback=feedback).eval()
        with torch.no_grad():
            a = cht.generate_sequence(cht.tasks(episode))
            b = cht.generate_sequence(cht.tasks(changed))
        assert not torch.allclose(a[0]["conv0_weight"], b[0]["conv0_weight"])  # θ_1 reads task 1
        same = torch.allclose(a[1]["logits_weight"], b[1]["logits_weight"])
        assert same != feedback, feedback


@pytest.mark.parametrize("scenario", ["class_incremental", "task_incremental", "mini_batch"])
def test_cht_scenarios_forward_and_loss(scenario):
    if scenario == "mini_batch":
        episode = image_episode(num_tasks=2, ways=WAYS, shots=2)
    else:
        episode = image_episode(num_tasks=2, ways=3 * WAYS, shots=1)
    cht = small_cht(scenario=scenario)
    logits = cht(episode)
    assert logits.shape == (2, episode.num_query, episode.num_classes)
    if scenario == "task_incremental":  # only the query's own task's prototypes are allowed
        task_of_class = torch.arange(episode.num_classes) // WAYS
        allowed = task_of_class == (episode.y_query // WAYS).unsqueeze(-1)
        assert (logits[~allowed] < -1e8).all() and (logits[allowed] > -1e8).all()
    loss = cht.loss(episode)
    loss.backward()
    assert torch.isfinite(loss) and cht.generator.labels.weight.grad is not None


def test_accuracy_matrix_average_and_backward_transfer_on_a_hand_example():
    from hypernets.continual import summarize

    acc = torch.tensor([[0.9, nan, nan],
                        [0.8, 0.7, nan],
                        [0.6, 0.75, 0.5]])
    average, backward = summarize(acc)
    assert average == pytest.approx((0.6 + 0.75 + 0.5) / 3)
    assert backward == pytest.approx(((0.6 - 0.9) + (0.75 - 0.7)) / 2)
    assert summarize(torch.tensor([[0.5], [0.7]])) == (pytest.approx(0.7), None)


def test_accuracy_matrix_of_a_learner_that_knows_only_the_first_task():
    """A learner right on task 1's labels and wrong elsewhere: acc[t][0] = 1, every other entry 0."""
    from hypernets.continual import accuracy_matrix
    from metaopt.learners import Learner

    class FirstTaskOracle(Learner):
        kinds = ("classification",)

        def forward(self, episode):
            guess = torch.where(episode.y_query < WAYS, episode.y_query, (episode.y_query + 1) % WAYS)
            return torch.nn.functional.one_hot(guess, episode.num_classes).float()

    acc = accuracy_matrix(FirstTaskOracle(), image_episode(ways=3 * WAYS, shots=1), WAYS, "class_incremental")
    expected = torch.tensor([[1.0, nan, nan], [1.0, 0.0, nan], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(acc, expected, equal_nan=True)



def test_continual_recipe_trains_compares_and_writes_accuracy_matrices(tmp_path, caplog):
    import json
    import logging

    caplog.set_level(logging.INFO, logger="hypernets.continual")

    from metaopt.cli import main

    evaluate = "evaluate=[{_target_: hypernets.continual.evaluate_sequences, lengths: [3, 4], sequences: 2}]"
    code = main(["run", "continual_hypertransformer", "train.steps=2", "train.batch_size=2", "train.val_tasks=2",
                 "learners.protonet_merged_support.train.steps=2", "task.queries=1", "train.query=15",
                 "compare.query=15", "compare.num_tasks=4", "compare.bootstrap=10", "wandb.mode=disabled",
                 f"output_dir={tmp_path}", "progress=false", "threads=1", evaluate])
    assert code == 0
    (results,) = tmp_path.glob("continual_hypertransformer/*/continual.json")
    matrices = json.loads(results.read_text())
    assert set(matrices) == {"cht_class_incremental", "cht_task_incremental", "ht_one_task_at_a_time",
                             "protonet_merged_support"}
    four = matrices["cht_class_incremental"]["4"]
    assert len(four["accuracy"]) == 4 and four["accuracy"][0][1] is None and four["backward_transfer"] is not None
    assert "extrapolated" in caplog.text
