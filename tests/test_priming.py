"""Knowledge priming (metaopt/dynamics, metaopt/pipelines/priming.py) and ignore-k pruning (optimizers/pruning.py)."""

import json
import math
import pickle

import pytest
import torch
from torch import nn

import optimizers as O
from metaopt.cli import main
from metaopt.dynamics import priming as P
from metaopt.dynamics.facts import CATEGORIES, FactWorld, stepping_stone_text
from metaopt.dynamics.language_model import CausalLM, pretrain
from metaopt.pipelines import build, load
from metaopt.testing import shrunk


# --- ignore-k ---------------------------------------------------------------------------------------------------
def test_ignore_top_k_zeroes_exactly_the_largest_coordinates():
    u = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0], [0.0, 4.0, -1.5]])
    out = O.ignore_top_k(0.34).update({"u": u}, O.EmptyState())[0]["u"]
    expected = u.clone()
    expected[0, 1] = expected[2, 1] = expected[1, 0] = 0.0  # floor(0.34 * 9) = 3: 4.0, -3.0, 2.0
    assert torch.equal(out, expected)
    assert torch.equal(O.top_k_mask(torch.ones(10), 0.25).sum(), torch.tensor(8.0))  # ties: exactly 2 dropped
    assert torch.equal(O.top_k_mask(u, 0.0), torch.ones_like(u))


def test_ignore_top_k_is_differentiable_through_the_kept_coordinates():
    lr = torch.tensor(0.5, requires_grad=True)
    grads = {"w": torch.tensor([1.0, -4.0, 2.0, 0.5])}
    opt = O.pruned(O.sgd(lr), 0.25)
    updates, _ = opt.update(grads, opt.init({"w": torch.zeros(4)}), {"w": torch.zeros(4)})
    assert torch.equal(updates["w"].detach(), torch.tensor([-0.5, 0.0, -1.0, -0.25]))
    (d_lr,) = torch.autograd.grad(updates["w"].sum(), lr)
    assert d_lr == pytest.approx(-(1.0 + 2.0 + 0.5))  # the dropped coordinate adds nothing
    u = torch.tensor([3.0, 1.0, -2.0], requires_grad=True)
    (d_u,) = torch.autograd.grad(O.ignore_top_k(0.34).update({"u": u}, O.EmptyState())[0]["u"].sum(), u)
    assert torch.equal(d_u, torch.tensor([0.0, 1.0, 1.0]))


def test_pruned_runs_through_as_torch_optimizer_with_its_options_and_pickles():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    opt = O.as_torch_optimizer(O.pruned(O.sgd(0.1, momentum=0.9), 0.2), net.named_parameters())
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9
    transform = O.pruned(O.sgd(0.1, momentum=0.9), 0.2)
    state = transform.init(params)
    for _ in range(3):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        grads = torch.func.grad(lambda p: ((torch.func.functional_call(net, p, (x,)) - y) ** 2).mean())(params)
        updates, state = transform.update(grads, state, params)
        params = O.apply_updates(params, updates)
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), params[k])
    assert isinstance(pickle.loads(pickle.dumps(opt)), torch.optim.Optimizer)
    with pytest.raises(ValueError, match="fraction must be in"):
        O.pruned(O.sgd(0.1), 1.0)


# --- the fact world ---------------------------------------------------------------------------------------------
def test_the_corpus_generator_is_deterministic():
    a, b, c = FactWorld(seed=3), FactWorld(seed=3), FactWorld(seed=4)
    assert a.names == b.names and a.values == b.values and a.vocabulary.words == b.vocabulary.words
    assert torch.equal(a.corpus(20, 24, seed=1), b.corpus(20, 24, seed=1))
    assert not torch.equal(a.corpus(20, 24, seed=1), a.corpus(20, 24, seed=2))
    assert a.names != c.names
    assert a.facts(4, seed=0) == b.facts(4, seed=0)
    facts = a.facts(4, seed=0)
    assert {f.category for f in facts} == set(CATEGORIES)
    for fact in facts:
        assert fact.text == f"{fact.context} {fact.keyword} ."
        a.vocabulary.encode(stepping_stone_text(fact))  # every word is known
        if fact.category == "outlandish":
            assert fact.entity in a.known and fact.keyword != a.values[fact.entity][fact.theme]
        if fact.category == "mundane":
            assert fact.entity not in a.known
    # the corpus states the world's facts: the word after a colour template is the entity's colour
    text = a.vocabulary.decode(a.corpus(5, 64, seed=1).reshape(-1)).split(" . ")
    for sentence in text:
        if sentence.startswith("the favourite colour of "):
            entity, value = sentence.split()[4], sentence.split()[6]
            assert a.values[entity]["colour"] == value


# --- S_mem and S_prime on a hand-made model ---------------------------------------------------------------------
class Bigram(nn.Module):
    """Next-token logits that depend only on the last token: ``table[last]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, ids):
        return self.table[ids]


def test_priming_scores_match_a_hand_computation():
    before = Bigram(torch.zeros(4, 4))  # uniform: every probability 1/4
    table = torch.zeros(4, 4)
    table[1, 3] = math.log(3.0)  # after token 1: p(3) = 3 / 6
    table[2, 3] = math.log(5.0)  # after token 2: p(3) = 5 / 8
    after = Bigram(table)
    scores = P.priming_scores(before, after, context=[0, 1], thematic=[[2], [0, 0]], keyword=3)
    assert scores.before_context == pytest.approx(0.25)
    assert scores.s_mem == pytest.approx((3 / 6) / 0.25)
    assert scores.s_prime == pytest.approx(((5 / 8) / 0.25 + 0.25 / 0.25) / 2)


def test_injection_raises_the_keyword_and_leaves_the_model_alone():
    world = FactWorld(entities=6, new_entities=2, seed=0)
    corpus = world.corpus(32, 16, seed=0)
    torch.manual_seed(0)
    model = CausalLM(len(world.vocabulary), max_len=16, n_embd=16, n_layer=1, n_head=2)
    fact = world.facts(1, seed=0)[1]
    ids = world.vocabulary.encode(f"<bos> {fact.text}")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    after = P.inject(model, corpus, ids, steps=5, batch_size=4, optimizer=O.sgd(0.5, momentum=0.9), seed=0)
    context = world.vocabulary.encode(f"<bos> {fact.context}")
    scores = P.priming_scores(model, after, context, [context], world.vocabulary.ids[fact.keyword])
    assert scores.s_mem > 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k])


def test_the_language_model_is_causal_and_its_pretraining_is_cached(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(20, max_len=8, n_embd=16, n_layer=2, n_head=2)
    ids = torch.randint(20, (2, 8))
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 20
    torch.testing.assert_close(model(ids)[:, :5], model(changed)[:, :5])
    corpus = torch.randint(20, (16, 8))
    kwargs = dict(steps=3, batch_size=4, lr=1e-2, seed=0, cache_dir=tmp_path, identity={"test": 1})
    trained, cached = pretrain(model, corpus, **kwargs)
    assert not cached and len(list(tmp_path.iterdir())) == 1
    torch.manual_seed(1)
    again, cached = pretrain(CausalLM(20, max_len=8, n_embd=16, n_layer=2, n_head=2), corpus, **kwargs)
    assert cached
    for (k, a), (_, b) in zip(trained.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


# --- the recipe ---------------------------------------------------------------------------------------------------
def test_the_priming_recipe_runs_shrunk_and_reports_its_claims(tmp_path):
    assert build(load("knowledge_priming")).facts
    assert main(["run", "knowledge_priming", f"output_dir={tmp_path}", *shrunk("knowledge_priming")]) == 0
    (run_dir,) = (tmp_path / "knowledge_priming").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["claims"]) == 7 and not results["pretrained_from_cache"]
    assert set(results["mitigations"]) == {"plain", "stepping_stone", "ignore_k"}
    assert len(list((tmp_path / "cache").iterdir())) == 1
    for figure in ("priming_vs_prior", "mitigations", "retention"):
        assert (run_dir / "figures" / f"{figure}.png").is_file()
    with pytest.raises(Exception, match="retention.facts_per_category"):
        load("knowledge_priming", ["retention.facts_per_category=50"])
