"""The shared building blocks: the MLP builder, the attention family and the pre-norm transformer block."""

import functools
import math

import pytest
import torch
from torch import nn

from metaopt.learners.attention import Block, SoftmaxAttention
from metaopt.learners.incontext import MesaAttention, MomentumAttention
from metaopt.learners.incontext.tokens import prefix_mask
from metaopt.learners.mlp import mlp

ATTENTION_TYPES = {
    "softmax": SoftmaxAttention,
    "momentum": functools.partial(MomentumAttention, momentum=0.7),
    "mesa": MesaAttention,
}


# ---------------------------------------------------------------------- mlp
def test_mlp_layout_and_names():
    net = mlp(3, [5, 7], 2, activation=nn.GELU, dropout=0.1)
    assert [type(m) for m in net] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear, nn.Dropout]
    assert [n for n, _ in net.named_parameters()] == [f"{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [(3, 5), (5, 7), (7, 2)]
    # the defaults are Finn et al.'s 1-40-40-1 ReLU network, with no dropout layer
    assert [type(m) for m in mlp()] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [type(m) for m in mlp(4, [], 1)] == [nn.Linear]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"in_features": 0}, "in_features"), ({"hidden": [8, True]}, r"hidden\[1\]"),
     ({"out_features": 2.0}, "out_features"), ({"dropout": 1.5}, "dropout")],
)
def test_mlp_refuses_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlp(**kwargs)


# ---------------------------------------------------------------------- attention
def _reference_softmax(attn: SoftmaxAttention, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention written out, heads by hand."""
    B, L, C = h.shape
    H, D = attn.n_head, attn.head_dim
    q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in attn.qkv(h).split(C, dim=2))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf")).softmax(-1)
    return attn.proj((scores @ v).transpose(1, 2).reshape(B, L, C))


@pytest.mark.parametrize("bias", [True, False])
def test_softmax_attention_with_a_causal_mask_and_with_a_key_mask(bias):
    torch.manual_seed(0)
    attn = SoftmaxAttention(8, 2, bias=bias)
    assert (attn.qkv.bias is not None) == bias and (attn.proj.bias is not None) == bias
    h = torch.randn(3, 5, 8)
    causal = prefix_mask(3, [1, 3], probes_see_themselves=True, device=h.device)  # [5, 5]
    torch.testing.assert_close(attn(h, causal), _reference_softmax(attn, h, causal))
    keys = torch.rand(3, 5) > 0.3
    keys[:, 0] = True  # every row sees a token
    key_mask = keys[:, None, None, :]  # [B, 1, 1, L]
    torch.testing.assert_close(attn(h, key_mask), _reference_softmax(attn, h, key_mask))
    torch.testing.assert_close(attn(h), _reference_softmax(attn, h, torch.ones(5, 5, dtype=torch.bool)))


@pytest.mark.parametrize("layer", [MomentumAttention, MesaAttention])
def test_momentum_and_mesa_attention_need_a_square_mask(layer):
    attn, h = layer(8, 2), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"mask \[L, L\]"):
        attn(h, torch.ones(2, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask \[L, L\]"):
        attn(h)


def test_attention_settings_are_validated():
    with pytest.raises(ValueError, match="divisible"):
        SoftmaxAttention(10, 4)
    with pytest.raises(ValueError, match="n_head"):
        SoftmaxAttention(8, 0)
    with pytest.raises(ValueError, match="dropout"):
        SoftmaxAttention(8, 2, dropout=-0.1)
    with pytest.raises(ValueError, match="head_dim"):
        MesaAttention(8, 2, head_dim=0)
    mesa = MesaAttention(5, 2, head_dim=5)  # an explicit head width needs no divisibility
    assert mesa.qkv.out_features == 3 * 2 * 5 and mesa.proj.in_features == 2 * 5


# ---------------------------------------------------------------------- the block
@pytest.mark.parametrize("name", list(ATTENTION_TYPES))
def test_block_is_a_pre_norm_residual_block_for_every_attention_type(name):
    torch.manual_seed(0)
    block = Block(8, 2, attn_layer=ATTENTION_TYPES[name])
    h = torch.randn(2, 6, 8)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    middle = h + block.attn(block.ln_1(h), mask)
    torch.testing.assert_close(block(h, mask), middle + block.mlp(block.ln_2(middle)))
    # causal under a causal mask: a change at position 4 leaves positions 0..3 untouched
    changed = h.clone()
    changed[:, 4] += 1.0
    torch.testing.assert_close(block(changed, mask)[:, :4], block(h, mask)[:, :4])
    assert not torch.allclose(block(changed, mask)[:, 4:], block(h, mask)[:, 4:])


def test_block_settings():
    block = Block(8, 2, attn_layer=functools.partial(SoftmaxAttention, bias=False), mlp_ratio=2,
                  norm_layer=nn.Identity, dropout=0.1)
    assert isinstance(block.ln_1, nn.Identity) and isinstance(block.ln_2, nn.Identity)
    assert block.attn.qkv.bias is None and block.attn.dropout == 0.1
    assert [type(m) for m in block.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.Dropout]
    assert block.mlp[0].out_features == 16
