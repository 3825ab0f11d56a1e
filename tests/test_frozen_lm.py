"""The frozen-LM in-context learner, teaching-sequence mixing and the nearest-example head analysis."""

import math

import pytest
import torch
import torch.nn.functional as F

from metaopt.analysis.nearest_heads import attention_maps, nearest_example_heads, nearest_example_mass, nearest_examples
from metaopt.learners import FrozenLM, Transformer
from metaopt.learners.attention import SoftmaxAttention
from metaopt.tasks import Conjunction
from metaopt.tasks.boolean import BooleanFamily

TINY = {"world": {"entities": 6, "new_entities": 2, "documents": 16, "length": 12},
        "model": {"n_embd": 8, "n_layer": 1, "n_head": 2}, "pretrain": {"steps": 2, "batch_size": 4}}


def test_gradients_reach_only_the_new_layers(tmp_path):
    learner = FrozenLM(4, max_support=6, cache_dir=str(tmp_path), **TINY)
    assert not bool(learner.pretrained)
    episode = Conjunction(4).sample(3, 6, 2, generator=torch.Generator().manual_seed(0))
    learner.loss(episode).backward()
    assert bool(learner.pretrained) and list(tmp_path.glob("lm_*.pt"))  # pretrained on first use, cached
    trained = {name for name, p in learner.named_parameters() if p.grad is not None}
    assert trained == {"read_in.weight", "read_in.bias", "read_out.weight", "read_out.bias"}
    assert all(not p.requires_grad for p in learner.lm.parameters())


def test_pretraining_is_cached_and_not_redone_after_a_checkpoint(tmp_path):
    first = FrozenLM(4, max_support=6, cache_dir=str(tmp_path), **TINY)
    first.ensure_pretrained()
    second = FrozenLM(4, max_support=6, cache_dir=str(tmp_path), **TINY)
    second.ensure_pretrained()  # loaded from the cache: the same weights
    for a, b in zip(first.lm.parameters(), second.lm.parameters()):
        assert torch.equal(a, b)
    third = FrozenLM(4, max_support=6, cache_dir=None, **TINY)
    third.load_state_dict(first.state_dict())
    assert bool(third.pretrained)


def test_frozen_lm_refuses_bad_settings():
    with pytest.raises(ValueError, match="world takes"):
        FrozenLM(4, max_support=4, world={"colours": 3})
    with pytest.raises(ValueError, match="positions"):
        FrozenLM(4, max_support=40, **TINY)


def test_teaching_probability_mixes_tasks_with_and_without_sequences():
    family = Conjunction(6, teaching=0.5)
    episode = family.sample(400, 10, 1, generator=torch.Generator().manual_seed(0))
    taught = episode.info["teaching_length"] > 0
    assert 0.4 < taught.float().mean() < 0.6
    full = Conjunction(6, teaching=True).sample(400, 10, 1, generator=torch.Generator().manual_seed(0))
    assert (full.info["teaching_length"] > 0).all()
    rows, length = family._teaching_rows(episode.info)
    for t in torch.nonzero(taught).flatten()[:20]:  # the taught tasks start with their sequence
        assert torch.equal(episode.x_support[t, : length[t]], rows[t, : length[t]])
    # teaching=True and False draw exactly what they drew before (no extra random numbers)
    plain = Conjunction(6).sample(5, 10, 1, generator=torch.Generator().manual_seed(1))
    again = Conjunction(6, teaching=0.0).sample(5, 10, 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain.x_support, again.x_support)
    for bad in (1.5, -0.1, "half"):
        with pytest.raises(ValueError, match="teaching must be a bool or a probability"):
            Conjunction(6, teaching=bad)
    with pytest.raises(ValueError, match="not available"):
        BooleanFamily(6, teaching=0.5)  # a class without teaching sequences


def test_nearest_example_mass_on_a_hand_made_attention():
    # three examples: x_2 is nearest to x_0 (distance 0), x_1 is at distance 2 from x_0
    x = torch.tensor([[[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]]])
    assert nearest_examples(x)[0].tolist() == [[False] * 3, [True, False, False], [True, False, False]]
    L = 6
    attention = torch.zeros(1, 2, L, L)
    attention[0, 0, 2, 1] = 1.0  # head 0: x_1 looks at y_0 (its nearest), x_2 at x_0 (its nearest)
    attention[0, 0, 4, 0] = 1.0
    attention[0, 1, 2, 2] = 1.0  # head 1: every token looks at itself
    attention[0, 1, 4, 4] = 1.0
    mass, chance = nearest_example_mass(attention, x)
    assert mass.tolist() == [1.0, 0.0]
    assert chance.item() == pytest.approx((2 / 3 + 2 / 5) / 2)


def test_attention_maps_recompute_the_fused_attention():
    torch.manual_seed(0)
    learner = Transformer(4, max_support=5, n_embd=8, n_layer=2, n_head=2)
    episode = Conjunction(4).sample(2, 5, 1, generator=torch.Generator().manual_seed(0))
    maps = attention_maps(learner, episode)
    assert set(maps) == {"blocks.0.attn", "blocks.1.attn"}
    attn: SoftmaxAttention = learner.blocks[0].attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(h=args[0], mask=args[1], out=out))
    with torch.no_grad():
        learner.predict_prefixes(episode)
    handle.remove()
    B, L, _ = seen["h"].shape
    v = attn.qkv(seen["h"]).split(8, dim=2)[2].view(B, L, 2, 4).transpose(1, 2)
    out = attn.proj((maps["blocks.0.attn"] @ v).transpose(1, 2).reshape(B, L, 8))
    assert torch.allclose(out, seen["out"], atol=1e-5)
    assert torch.allclose(maps["blocks.0.attn"].sum(-1), torch.ones(B, 2, L))


def test_nearest_example_heads_claims_bound_the_best_head_and_refuse_bad_specs(tmp_path):
    from metaopt.log import Run
    from metaopt.seeds import SeedPlan
    from metaopt.tasks import NearestNeighbour

    torch.manual_seed(0)
    learners = {"transformer": Transformer(4, max_support=6, n_embd=8, n_layer=1, n_head=2)}
    run = Run("heads", {}, root=tmp_path, wandb_mode="disabled")
    claims = [{"text": "low bar", "learner": "transformer", "above": 1e-6},
              {"text": "high bar", "learner": "transformer", "above": 1e6}]
    results = nearest_example_heads(learners, NearestNeighbour(4, random_prefix=2), run, SeedPlan(0), num_tasks=4,
                                    support=6, claims=claims)
    best = results["transformer"]["best_ratio"]
    assert [c["holds"] for c in results["claims"]] == [True, False]
    assert all(c["measured"] == best for c in results["claims"])
    with pytest.raises(ValueError, match="claims\\[0\\] takes text, learner and above"):
        nearest_example_heads(learners, NearestNeighbour(4), run, SeedPlan(0), claims=[{"text": "t", "k": 3}])
    with pytest.raises(ValueError, match="no softmax attention heads"):
        nearest_example_heads(learners, NearestNeighbour(4, random_prefix=2), run, SeedPlan(0), num_tasks=2,
                              support=6, claims=[{"text": "t", "learner": "nn_1", "above": 1.0}])
