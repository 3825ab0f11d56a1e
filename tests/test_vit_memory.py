"""Memory-token ViT (Sandler et al. 2022): the mask, the multi-task pass, memory dropped after attention,
gradients only to the adapted parameters, the cached pretraining and the recipe end to end."""

import json

import pytest
import torch

from metaopt.cli import main
from metaopt.finetune import Split, fine_tune, fine_tune_task, pretrained_vit
from metaopt.learners import MemoryTokens
from metaopt.learners.vit import MEMORY_INIT_STD, MemoryViT, ViT, init_memory, masked_reference
from metaopt.pipelines import load
from metaopt.tasks import FewShotImages, Glyphs
from metaopt.testing import shrunk

SMALL = dict(image_size=16, patch_size=4, n_embd=16, n_layer=2, n_head=2)


def _model_and_tasks(seed=0, memory=3):
    torch.manual_seed(seed)
    model = ViT(**SMALL, num_classes=6).eval()
    tasks = [model.new_task(classes, memory) for classes in (5, 3, 4)]
    with torch.no_grad():  # trained-looking tokens, not their initial copies
        for task in tasks:
            task.cls.add_(torch.randn_like(task.cls))
            task.memory.mul_(50)
    return model, tasks


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_original_output_is_bit_identical_with_any_added_tasks(batch):
    model, tasks = _model_and_tasks()
    x = torch.rand(batch, 1, 16, 16)
    with torch.no_grad():
        alone = model(x)
        for k in range(1, len(tasks) + 1):
            assert torch.equal(model.forward_tasks(x, tasks[:k])[0], alone)


def test_tasks_run_concatenated_in_one_pass_exactly():
    model, tasks = _model_and_tasks()
    x = torch.rand(9, 1, 16, 16)
    with torch.no_grad():
        _, joint = model.forward_tasks(x, tasks)
        for i, task in enumerate(tasks):
            assert torch.equal(model.forward_tasks(x, [task])[1][0], joint[i])
            assert torch.equal(model.forward_tasks(x, tasks[::-1])[1][len(tasks) - 1 - i], joint[i])


def test_block_computation_is_the_papers_masked_sequence():
    """The block-by-block computation equals one sequence under the non-destructive mask (to rounding)."""
    model, tasks = _model_and_tasks()
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        original, per_task = model.forward_tasks(x, tasks)
        ref_original, ref_tasks = masked_reference(model, x, tasks)
    torch.testing.assert_close(original, ref_original, rtol=0, atol=1e-5)
    for ours, ref in zip(per_task, ref_tasks):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_task_tokens_are_hidden_from_the_original_but_shape_their_task():
    model, tasks = _model_and_tasks()
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        before = model.forward_tasks(x, tasks)
        tasks[0].memory.add_(torch.randn_like(tasks[0].memory))  # its own memory changes its output alone
        after = model.forward_tasks(x, tasks)
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1][0], after[1][0])
    assert torch.equal(before[1][1], after[1][1]) and torch.equal(before[1][2], after[1][2])


def test_memory_is_attended_then_dropped_after_each_layer():
    torch.manual_seed(0)
    model = ViT(**SMALL, num_classes=3).eval()
    memory = torch.randn(2, 5, 16)
    seen = []

    def record(module, args, out):
        seen.append(args[0].shape[1])

    for block in model.blocks:
        block.register_forward_hook(record)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        features = model.features(x, memory)
        h = model.tokens(x)  # by hand: append layer l's memory, run the block, keep the first n tokens
        for layer, block in enumerate(model.blocks):
            h = block(torch.cat([h, memory[layer].expand(3, -1, -1)], 1))[:, :h.shape[1]]
        plain = model.features(x)
    n = 1 + model.num_patches
    assert seen[:2] == [n + 5, n + 5]  # every layer reads its own memory appended ...
    assert torch.equal(features, model.ln_f(h[:, 0]))  # ... and passes on only the n original tokens
    assert not torch.allclose(features, plain)  # the memory was attended
    with torch.no_grad():  # the last layer's memory changes the output only through that layer's attention
        changed = memory.clone()
        changed[1] += torch.randn_like(changed[1])  # (a constant shift would vanish in the layer norm)
        assert not torch.allclose(model.features(x, changed), features)


def test_memory_initialisation_follows_the_paper():
    torch.manual_seed(0)
    memory = init_memory(12, 50, 64)
    assert memory.shape == (12, 50, 64)
    assert abs(memory.mean().item()) < 1e-3 and abs(memory.std().item() - MEMORY_INIT_STD) < 1e-3


def _episode():
    family = FewShotImages(Glyphs((8, 4, 4), size=16, samples_per_class=4), ways=2, shots=1, queries=2,
                           rotations=False)
    return family.sample(3, 2, 4, generator=torch.Generator().manual_seed(0))


def test_inner_loop_adapts_only_memory_and_head():
    learner = MemoryTokens(ways=2, **SMALL, memory_tokens=2, steps=2, freeze_backbone=True)
    assert sorted(learner.adapted_names) == ["memory", "new_head.bias", "new_head.weight"]
    episode = _episode()
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    adapted = learner.adapt(episode)
    assert set(adapted) == set(learner.adapted_names)
    assert all(v.shape[0] == 3 for v in adapted.values())  # one adapted copy per task
    learner.loss(episode).backward()
    with_grad = sorted(n for n, p in learner.named_parameters() if p.grad is not None)
    assert with_grad == ["model.memory", "model.new_head.bias", "model.new_head.weight"]
    assert all(torch.equal(p, before[n]) for n, p in learner.named_parameters())  # adapting changes no weight


def test_inner_loop_meta_learns_the_backbone_unless_frozen():
    learner = MemoryTokens(ways=2, **SMALL, memory_tokens=2, steps=1)
    learner.loss(_episode()).backward()
    assert all(p.grad is not None for p in learner.parameters())


def test_fine_tuning_modes_train_only_their_parameters():
    torch.manual_seed(0)
    backbone = ViT(**SMALL, num_classes=4)
    x, y = torch.rand(12, 1, 16, 16), torch.arange(12) % 3
    data = Split((x, y), (x, y), (x, y), num_classes=3)
    reference = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    counts = {}
    for mode in ("head", "memory", "full"):
        model, counts[mode] = fine_tune(backbone, mode, data, memory_tokens=2, steps=2, batch_size=4, lr=0.1, seed=0)
        changed = {n for n, p in model.backbone.named_parameters() if not torch.equal(p, reference[n])}
        assert (changed == set()) if mode != "full" else changed
    assert all(torch.equal(p, reference[n]) for n, p in backbone.named_parameters())  # a copy was tuned
    assert counts["head"] == 16 * 3 + 3 and counts["memory"] == counts["head"] + 2 * 2 * 16
    assert counts["full"] > 10 * counts["memory"]
    task = fine_tune_task(backbone, data, memory_tokens=2, steps=2, batch_size=4, lr=0.1, seed=0)
    assert all(torch.equal(p, reference[n]) for n, p in backbone.named_parameters())
    assert not torch.equal(task.cls.detach(), backbone.cls_token.detach()[0])


def test_pretraining_is_cached_and_reused(tmp_path):
    settings = dict(vit=SMALL, classes=4, per_class=3, steps=2, batch_size=8, lr=1e-3, seed=0, cache_dir=tmp_path)
    first, path, cached = pretrained_vit(**settings)
    second, same_path, cached_again = pretrained_vit(**settings)
    assert not cached and cached_again and path == same_path and path.parent == tmp_path
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    _, other, _ = pretrained_vit(**(settings | {"steps": 3}))
    assert other != path
    learner = MemoryTokens(ways=2, **SMALL, pretrained=str(path), freeze_backbone=True)
    assert torch.equal(learner.model.backbone.pos_embed, first.pos_embed)
    with pytest.raises(ValueError, match="pretrained="):
        MemoryTokens(ways=2, **SMALL, pretrained=str(tmp_path / "missing.pt"))


def test_pretrain_on_first_use_shares_the_studys_cached_vit(tmp_path):
    from metaopt.finetune import PRETRAIN_SEED_INDEX
    from metaopt.seeds import item_seed

    pretrain = dict(classes=4, per_class=3, steps=2, batch_size=8, lr=1e-3)
    learner = MemoryTokens(ways=2, **SMALL, steps=1, pretrain=pretrain, seed=3, cache_dir=str(tmp_path),
                           freeze_backbone=True)
    untouched = learner.model.backbone.pos_embed.detach().clone()
    assert not bool(learner.pretrained) and not list(tmp_path.iterdir())  # building costs nothing
    episode = FewShotImages(Glyphs(size=SMALL["image_size"]), ways=2, shots=1, queries=1).sample(
        2, 2, 2, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    learner(episode)
    assert torch.equal(torch.get_rng_state(), state)  # pretraining does not move the caller's stream
    # the study's pretraining (the recipe's seed through the same derivation) wrote the file the learner loaded
    study, path, cached = pretrained_vit(SMALL, seed=item_seed(3, PRETRAIN_SEED_INDEX), cache_dir=tmp_path, **pretrain)
    assert cached and list(tmp_path.iterdir()) == [path]
    assert torch.equal(learner.model.backbone.pos_embed, study.pos_embed)
    assert not torch.equal(learner.model.backbone.pos_embed, untouched)
    assert not any(p.requires_grad for p in learner.model.backbone.parameters())
    # a learner restored from a checkpoint keeps its backbone and does not pretrain again
    restored = MemoryTokens(ways=2, **SMALL, steps=1, pretrain=pretrain, seed=3, cache_dir=str(tmp_path / "elsewhere"))
    restored.load_state_dict(learner.state_dict())
    restored(episode)
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(ValueError, match="not both"):
        MemoryTokens(ways=2, **SMALL, pretrained=str(path), pretrain=pretrain)
    with pytest.raises(ValueError, match="pretrain takes exactly"):
        MemoryTokens(ways=2, **SMALL, pretrain={"classes": 4})


def test_memory_vit_without_memory_is_the_frozen_features():
    torch.manual_seed(0)
    backbone = ViT(**SMALL, num_classes=None)
    model = MemoryViT(backbone, 0, 3)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(model(x), model.new_head(backbone(x)))


def test_recipe_runs_shrunk(tmp_path):
    assert main(["run", "memory_tokens", f"output_dir={tmp_path}", *shrunk("memory_tokens")]) == 0
    (run_dir,) = (tmp_path / load("memory_tokens").name).iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["curves"]) == set(load("memory_tokens").learners)
    study = json.loads((run_dir / "memory_tokens.json").read_text())
    assert study["non_destructive"]["original_bit_identical"]
    assert len(study["claims"]) == 2 * len(load("memory_tokens").evaluate[0].targets) + 2
