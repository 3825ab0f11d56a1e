"""The in-context learner zoo: constructions, exactness of the mesa layer, causality, shapes, training."""

import pytest
import torch

from conftest import generator
from metaopt.learners import GradientDescent, Ridge, Transformer
from metaopt.learners.incontext import (
    HyenaLearner,
    LinearSelfAttention,
    LSTMLearner,
    MesaAttention,
    MesaLayer,
    MomentumAttention,
)
from metaopt.learners.incontext.tokens import context_tokens, prefix_mask
from metaopt.tasks import Conjunction, LinearDynamics, LinearRegression
from metaopt.train import MetaTrainer

D, S, Q = 4, 9, 3


def regression(dim: int = D, support: int = S, seed: int = 0):
    return LinearRegression(dim).sample(5, support, Q, generator=generator(seed))


def boolean(support: int = S):
    return Conjunction(D).sample(5, support, Q, generator=generator(0))


# ---------------------------------------------------------------------- the zoo
ZOO = {
    "lsa_full_concat": lambda: LinearSelfAttention(D, layers=2, heads=2, init_std=0.2),
    "lsa_diag": lambda: LinearSelfAttention(D, layers=2, parameterization="diag", init_std=0.2),
    "lsa_gdpp": lambda: LinearSelfAttention(D, layers=3, parameterization="gdpp", init_std=0.2),
    "mesa_concat": lambda: MesaLayer(D, layers=2, heads=2),
    "mesa_interleaved": lambda: MesaLayer(D, token_format="interleaved"),
    "lstm": lambda: LSTMLearner(D, hidden=16),
    "lstm_concat": lambda: LSTMLearner(D, hidden=16, token_format="concatenated"),
    "hyena": lambda: HyenaLearner(D, max_support=S, width=16),
    "hyena_concat": lambda: HyenaLearner(D, max_support=S, width=16, token_format="concatenated"),
    "transformer_momentum": lambda: Transformer(D, S, n_embd=16, n_layer=2, n_head=2, attention="momentum"),
    "transformer_softmax_mesa": lambda: Transformer(
        D, S, n_embd=16, n_layer=2, n_head=2, attention=["softmax", "mesa"]
    ),
}
CAUSAL = [name for name in ZOO if not name.startswith("lsa")]
BINARY = ["lstm", "hyena", "transformer_momentum"]


def build(name: str):
    torch.manual_seed(0)
    return ZOO[name]()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_smoke(name):
    """Forward shape with the task dimension first, backward, no NaN, one-pass per-k predictions."""
    model = build(name)
    assert model.implicit
    episode = regression()
    out = model(episode)
    assert out.shape == (5, Q, 1)
    model.loss(episode).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    ks = [0, 1, 4, S]
    with torch.no_grad():
        together = model.predict_by_support_size(episode, ks)
        assert together.shape == (len(ks), 5, Q, 1) and torch.isfinite(together).all()
        for i, k in enumerate(ks):
            torch.testing.assert_close(together[i], model(episode.take_support(k)), rtol=1e-5, atol=1e-5)
        # tasks do not interact: a sub-batch gives the same predictions
        torch.testing.assert_close(model(episode.select_tasks(slice(1, 3))), out[1:3].detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BINARY)
def test_binary_episodes(name):
    model = build(name)
    episode = boolean()
    assert model(episode).shape == (5, Q, 1)
    loss = model.loss(episode)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_models_ignore_later_examples(name):
    """Changing support example j leaves every prediction that sees fewer than j examples unchanged."""
    model = build(name).eval()
    episode, j = regression(), 5
    x, y = episode.x_support.clone(), episode.y_support.clone()
    x[:, j] += 3.0
    y[:, j] -= 2.0
    changed = episode.replace(x_support=x, y_support=y)
    with torch.no_grad():
        ks = list(range(S + 1))
        before, after = model.predict_by_support_size(episode, ks), model.predict_by_support_size(changed, ks)
        torch.testing.assert_close(after[: j + 1], before[: j + 1])
        assert not torch.allclose(after[j + 1 :], before[j + 1 :])
        # per-prefix predictions: y_i is predicted from examples < i and x_i
        p_before, p_after = model.predict_prefixes(episode), model.predict_prefixes(changed)
        torch.testing.assert_close(p_after[:, :j], p_before[:, :j])
        assert not torch.allclose(p_after[:, j + 1 :], p_before[:, j + 1 :])


@pytest.mark.parametrize("name", CAUSAL)
def test_prefix_prediction_equals_query_on_the_prefix(name):
    """The prediction of y_j from the prefix equals asking x_j as a query with only j examples."""
    model = build(name).eval()
    episode, j = regression(), 4
    probe = episode.take_support(j).replace(
        x_query=episode.x_support[:, j : j + 1], y_query=episode.y_support[:, j : j + 1]
    )
    with torch.no_grad():
        torch.testing.assert_close(model(probe)[:, 0], model.predict_prefixes(episode)[:, j], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- LSA constructions
@pytest.mark.parametrize("parameterization", ["full", "diag", "gdpp"])
@pytest.mark.parametrize("layers", [1, 3])
def test_from_gd_equals_gradient_descent(parameterization, layers):
    episode = regression(dim=6, support=8)
    lsa = LinearSelfAttention.from_gd(6, 0.3, layers=layers, heads=2, parameterization=parameterization)
    gd = GradientDescent(steps=layers, lr=0.3)
    ks = [0, 1, 3, 8]
    with torch.no_grad():
        torch.testing.assert_close(
            lsa.predict_by_support_size(episode, ks), gd.predict_by_support_size(episode, ks), rtol=1e-5, atol=1e-5
        )


def test_from_gd_with_vector_targets():
    episode = LinearDynamics(3).sample(4, 6, 2, generator=generator())
    with torch.no_grad():
        torch.testing.assert_close(
            LinearSelfAttention.from_gd(3, 0.5, y_dim=3)(episode), GradientDescent(1, 0.5)(episode),
            rtol=1e-5, atol=1e-5,
        )


def _gdpp_reference(xs, ys, xq, lr, gamma, steps):
    """GD++ written as the algorithm: GD on residuals with inputs preconditioned by (I − γ XᵀX/N) each step."""
    n = xs.shape[1]
    pred = torch.zeros(xq.shape[0], xq.shape[1], ys.shape[2])
    x, r, q = xs, ys, xq
    for _ in range(steps):
        cov = x.transpose(1, 2) @ x / n
        g = x.transpose(1, 2) @ r / n
        pred, r = pred + lr * q @ g, r - lr * x @ g
        x, q = x - gamma * x @ cov, q - gamma * q @ cov
    return pred


@pytest.mark.parametrize("parameterization", ["full", "diag", "gdpp"])
def test_from_gdpp_equals_the_gdpp_algorithm(parameterization):
    episode = regression(dim=5, support=10)
    lsa = LinearSelfAttention.from_gdpp(5, 0.4, 0.1, layers=3, parameterization=parameterization)
    expected = _gdpp_reference(episode.x_support, episode.y_support, episode.x_query, 0.4, 0.1, 3)
    with torch.no_grad():
        torch.testing.assert_close(lsa(episode), expected, rtol=1e-5, atol=1e-5)
    # and preconditioning changes the answer (the test would not notice γ being dropped otherwise)
    assert not torch.allclose(expected, GradientDescent(3, 0.4)(episode), atol=1e-3)


def test_lsa_layer_is_the_von_oswald_update():
    """One FULL layer on concatenated tokens: e ← e + Σ_h P_h V_h E (K_h E)ᵀ Q_h e / N with random P, V, K, Q."""
    torch.manual_seed(1)
    episode, E, H = regression(support=6), D + 1, 2
    P, V, K, Qm = (torch.randn(H, E, E) for _ in range(4))
    lsa = LinearSelfAttention(D, heads=H)
    with torch.no_grad():
        lsa.pv.copy_((P @ V)[None])
        lsa.kq.copy_((K.transpose(1, 2) @ Qm)[None])
        context = context_tokens(episode.x_support, episode.y_support, "concatenated")  # [T, N, E]
        query = torch.cat([episode.x_query, torch.zeros(5, Q, 1)], dim=-1)
        expected = query.clone()
        for h in range(H):
            outer = context.transpose(1, 2) @ (context @ K[h].T)  # Σ_j e_j (K e_j)ᵀ, [T, E, E]
            delta = P[h] @ V[h] @ outer @ Qm[h] @ query.transpose(1, 2) / 6  # [T, E, Q]
            expected = expected + delta.transpose(1, 2)
        torch.testing.assert_close(lsa(episode), -expected[..., -1:], rtol=1e-4, atol=1e-4)


def test_lsa_rejects_bad_settings():
    with pytest.raises(ValueError, match="parameterization"):
        LinearSelfAttention(D, parameterization="lowrank")
    with pytest.raises(ValueError, match="token_format"):
        LinearSelfAttention(D, token_format="stacked")
    with pytest.raises(ValueError, match="cannot pair"):
        LinearSelfAttention(D, token_format="interleaved")
    with pytest.raises(ValueError, match="x_dim=4"):
        LinearSelfAttention(D)(regression(dim=3))
    with pytest.raises(ValueError, match=rf"support_sizes\[0\] must be an int in \[0, {S}\]"):
        LinearSelfAttention(D).predict_by_support_size(regression(), [S + 1])


def test_one_layer_lsa_trains_to_the_best_gd_step():
    """von Oswald et al.: a trained 1-layer LSA reaches the loss of the best single GD step (d = N = 5)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention
    model = LinearSelfAttention(5)
    trainer = MetaTrainer(model, LinearRegression(5), steps=150, batch_size=256, support=5, query=1, lr=2e-2,
                          val_every=150, val_tasks=4096, checkpoint_every=10**6, progress=False)
    trainer.fit()
    episode = trainer.val_episode
    with torch.no_grad():
        best_gd = min(GradientDescent(1, lr).loss(episode).item() for lr in torch.linspace(0.1, 1.0, 37).tolist())
        trained = model.loss(episode).item()
        zero = episode.y_query.pow(2).mean().item()
    assert best_gd < 0.7 * zero  # the comparison is meaningful: one GD step is far better than predicting 0
    assert trained < 1.05 * best_gd


# ---------------------------------------------------------------------- the mesa layer
def _direct_mesa(attn: MesaAttention, h: torch.Tensor) -> torch.Tensor:
    """Causal mesa attention by a direct ridge solve at every position (a loop, torch.linalg.solve)."""
    B, L, _ = h.shape
    H, Dh = attn.n_head, attn.head_dim
    q, k, v = (t.view(B, L, H, Dh) for t in attn.qkv(h).split(H * Dh, dim=2))
    outs = []
    for t in range(L):
        heads = []
        for i in range(H):
            K, V = k[:, : t + 1, i], v[:, : t + 1, i]  # [B, t + 1, Dh]
            gram = K.transpose(1, 2) @ K + torch.eye(Dh) / attn.lam[i]
            phi = V.transpose(1, 2) @ K @ torch.linalg.inv(gram)  # least-squares map, [B, Dh, Dh]
            w = torch.linalg.solve(gram, q[:, t, i].unsqueeze(-1))  # same thing, solved: R_t q_t
            heads.append((V.transpose(1, 2) @ K @ w).squeeze(-1))
            torch.testing.assert_close(heads[-1], (phi @ q[:, t, i].unsqueeze(-1)).squeeze(-1), rtol=1e-3, atol=1e-4)
        outs.append(torch.cat(heads, dim=-1))
    return attn.proj(torch.stack(outs, dim=1))


def _sherman_morrison_mesa(attn: MesaAttention, h: torch.Tensor) -> torch.Tensor:
    """The paper's recursion: R_0 = λI, R_t = R_{t−1} − R_{t−1} k kᵀ R_{t−1} / (1 + kᵀ R_{t−1} k)."""
    B, L, _ = h.shape
    H, Dh = attn.n_head, attn.head_dim
    q, k, v = (t.view(B, L, H, Dh).transpose(1, 2) for t in attn.qkv(h).split(H * Dh, dim=2))  # [B, H, L, Dh]
    R = attn.lam.view(1, H, 1, 1) * torch.eye(Dh).expand(B, H, Dh, Dh)
    M = torch.zeros(B, H, Dh, Dh)  # Σ v kᵀ
    outs = []
    for t in range(L):
        kt = k[:, :, t].unsqueeze(-1)  # [B, H, Dh, 1]
        Rk = R @ kt
        R = R - Rk @ Rk.transpose(-1, -2) / (1 + kt.transpose(-1, -2) @ Rk)
        M = M + v[:, :, t].unsqueeze(-1) @ kt.transpose(-1, -2)
        outs.append((M @ R @ q[:, :, t].unsqueeze(-1)).squeeze(-1))  # [B, H, Dh]
    out = torch.stack(outs, dim=2)  # [B, H, L, Dh]
    return attn.proj(out.transpose(1, 2).reshape(B, L, H * Dh))


def test_mesa_attention_equals_a_ridge_solve_at_every_position_forward_and_gradient():
    torch.manual_seed(0)
    attn = MesaAttention(8, 2, lam_init=0.7).double()
    h = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    fast, direct = attn(h, mask), _direct_mesa(attn, h)
    torch.testing.assert_close(fast, direct)
    torch.testing.assert_close(fast, _sherman_morrison_mesa(attn, h))
    weights = torch.randn_like(fast)
    params = [h, attn.log_lam, attn.qkv.weight]
    g_fast = torch.autograd.grad((fast * weights).sum(), params)
    g_direct = torch.autograd.grad((direct * weights).sum(), params)
    for a, b in zip(g_fast, g_direct):
        torch.testing.assert_close(a, b)


def test_mesa_attention_gradcheck():
    torch.manual_seed(0)
    attn = MesaAttention(4, 1, lam_init=2.0).double()
    h = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = prefix_mask(3, [0, 2], probes_see_themselves=False, device=h.device)
    assert torch.autograd.gradcheck(lambda x: attn(x, mask), (h,))
    # a probe that sees nothing predicts 0 (before the output projection's bias)
    torch.testing.assert_close(attn(h, mask)[:, 3], attn.proj.bias.expand(1, 4))


@pytest.mark.parametrize(
    "make_episode", [lambda: regression(), lambda: LinearDynamics(D).sample(5, S, Q, generator=generator())]
)
def test_mesa_from_ridge_equals_ridge_at_every_support_size(make_episode):
    episode = make_episode()
    y_dim = episode.y_support.shape[-1]
    ks = list(range(S + 1))
    with torch.no_grad():
        torch.testing.assert_close(
            MesaLayer.from_ridge(D, 0.3, y_dim=y_dim).predict_by_support_size(episode, ks),
            Ridge(0.3).predict_by_support_size(episode, ks), rtol=1e-4, atol=1e-4,
        )


# ---------------------------------------------------------------------- momentum attention
def _momentum_attention_by_loops(attn, h, mask, eta, normalize):
    """Dai et al.'s momentum attention one row, head and task at a time, from the layer's projections.

    Row t attends (softmax of scaled dot products) to the tokens its mask allows, then adds
    ``Σ η^{r} v_j`` over the other tokens it may see, r = 1 for the nearest of them, 2 for the next, ...
    (divided by ``Σ η^{r}`` when ``normalize``), per head, before the output projection.
    """
    B, L, C = h.shape
    H = attn.n_head
    c = C // H
    q, k, v = attn.qkv(h).split(C, dim=2)
    out = torch.zeros(B, L, C, dtype=h.dtype)
    for b in range(B):
        for head in range(H):
            cols = slice(head * c, (head + 1) * c)
            for t in range(L):
                seen = [j for j in range(L) if mask[t, j]]
                scores = torch.stack([q[b, t, cols] @ k[b, j, cols] for j in seen]) / c**0.5
                probs = torch.exp(scores - scores.max())
                probs = probs / probs.sum()
                row = sum(p * v[b, j, cols] for p, j in zip(probs, seen))
                earlier = [j for j in seen if j != t][::-1]  # nearest first
                weights = [eta ** (r + 1) for r in range(len(earlier))]
                total = sum(weights) if normalize and earlier else 1.0
                for w, j in zip(weights, earlier):
                    row = row + (w / total) * v[b, j, cols]
                out[b, t, cols] = row
    return attn.proj(out)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masking", ["causal", "probes"])
def test_momentum_attention_matches_a_loop_over_positions(normalize, masking):
    torch.manual_seed(0)
    attn = MomentumAttention(8, 2, momentum=0.8, normalize=normalize).double()
    # 6 context tokens, then probes that see the first 0, 2, 4 and 6 of them (and themselves)
    mask = (torch.ones(6, 6, dtype=torch.bool).tril() if masking == "causal"
            else prefix_mask(6, torch.tensor([0, 2, 4, 6]), probes_see_themselves=True, device="cpu"))
    h = torch.randn(3, mask.shape[0], 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn(h, mask), _momentum_attention_by_loops(attn, h, mask, 0.8, normalize))


def test_momentum_attention_weights():
    attn = MomentumAttention(8, 2, momentum=0.8)
    # a query after the first n tokens is weighted as if it sat at position n
    weights = attn.momentum_weights(prefix_mask(4, [2], probes_see_themselves=True, device="cpu"), torch.float32)
    torch.testing.assert_close(weights[4], torch.tensor([0.8**2, 0.8, 0.0, 0.0, 0.0]))
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(attn.momentum_weights(causal, torch.float32)[5, :5], 0.8 ** torch.arange(5.0, 0, -1))
    normalized = MomentumAttention(8, 2, momentum=0.8, normalize=True).momentum_weights(causal, torch.float32)
    torch.testing.assert_close(normalized[1:].sum(-1), torch.ones(5))
    assert normalized[0].abs().sum() == 0  # the first token has nothing before it


def test_transformer_attention_setting_is_validated():
    with pytest.raises(ValueError, match="attention"):
        Transformer(D, S, n_embd=16, n_layer=2, n_head=2, attention="linear")
    with pytest.raises(ValueError, match="one per layer"):
        Transformer(D, S, n_embd=16, n_layer=2, n_head=2, attention=["mesa"])
    with pytest.raises(ValueError, match="momentum"):
        Transformer(D, S, n_embd=16, n_layer=2, n_head=2, attention="momentum", momentum=1.5)
    kinds = [type(b.attn).__name__ for b in Transformer(D, S, n_embd=16, n_layer=2, n_head=2,
                                                         attention=["softmax", "mesa"]).blocks]
    assert kinds == ["SoftmaxAttention", "MesaAttention"]
