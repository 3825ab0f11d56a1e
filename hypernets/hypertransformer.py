"""HyperTransformer (Zhmoginov, Sandler & Vladymyrov, ICML 2022): a transformer writes a CNN's weights from support.

For every generated layer ``l`` of the target CNN (:class:`~hypernets.cnn.FunctionalCNN`) one transformer
encoder reads

- one token per support image: ``[label embedding ; image-embedder features ; features of the layer's input
  activations]``, where the label table has one extra "unlabelled" entry for the unlabelled images of
  semi-supervised episodes, the image embedder is shared by all layers, and the activations are those of
  the image after the layers ``1..l−1`` that were *already generated* (sequential generation);
- one weight-slice placeholder token per output channel of the layer (a learned embedding; for the logits
  layer the placeholder of class ``k`` also carries the label embedding of ``k``, so it can attend to the
  support images of its class);

and the encoder's outputs at the placeholders, through a linear head, are the layer's weight slices (a
channel's kernel and bias). No positional encoding: reordering the support set permutes tokens, leaves
every placeholder output unchanged, and so leaves the generated weights unchanged. The logits layer is
always generated; with ``generate="logits"`` the conv layers are ordinary meta-learned parameters shared by
all tasks. The whole model is trained end to end on the query cross-entropy (``Learner.loss``).

Batch norm in the target CNN uses per-task statistics of the labelled support set (see ``hypernets.cnn``),
so unlabelled images and queries never change the statistics.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hypernets.cnn import NUM_CONV, FunctionalCNN, LayerSpec, Params
from metaopt.checks import one_of, positive_int
from metaopt.episodes import Episode
from metaopt.learners.attention import Block, SoftmaxAttention
from metaopt.learners.base import Example, Learner
from metaopt.learners.task_folding import fold, folded_conv, unfold
from metaopt.tasks.images.few_shot import FewShotImages

GENERATE = ("all", "logits")


# ---------------------------------------------------------------------- the encoder (not causal)
class Encoder(nn.Module):
    """Pre-norm transformer blocks (``metaopt.learners.attention.Block``) over a set of tokens, then a final norm.

    Softmax attention without biases and an MLP of width ``2 · n_embd``; ``layer_norm=False`` leaves the
    residual stream un-normalised (hand-set weights). ``key_mask`` ``[T, L]`` (True = visible) hides tokens
    from every other token.

    Only the outputs at the last tokens (a layer generator's weight-slice placeholders) are read, so the
    blocks run on the blocks' own weights with two savings that leave every output as ``Block`` computes it:
    the last block attends from those tokens only (the other tokens' outputs would be dropped), and tokens
    that are the same in every task (the placeholders) are normalised and projected once, not once per task.
    """

    def __init__(self, n_embd: int, n_head: int, n_layer: int, layer_norm: bool = True) -> None:
        super().__init__()
        norm = nn.LayerNorm if layer_norm else nn.Identity
        attention = functools.partial(SoftmaxAttention, bias=False)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, attn_layer=attention, mlp_ratio=2, norm_layer=norm)
                                     for _ in range(n_layer)])
        self.ln_f = norm(n_embd)

    def forward(self, x: Tensor, queries: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """The final outputs ``[T, P, C]`` at the tokens ``queries``, which follow the tokens ``x`` ``[T, S, C]``.

        ``queries`` is ``[P, C]`` when it is the same in every task, else ``[T, P, C]``; ``key_mask`` covers all
        ``S + P`` tokens.
        """
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [T, 1, 1, L], broadcast over queries
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            x, queries = _block(block, x, queries, mask, outputs_of_x=index < last)
        return self.ln_f(queries)


def _block(block: Block, x: Tensor, y: Tensor, mask: Tensor | None, *,
           outputs_of_x: bool) -> tuple[Tensor, Tensor]:
    """``block`` on the tokens ``[x; y]``: ``x`` ``[T, S, C]``, ``y`` ``[P, C]`` (every task's) or ``[T, P, C]``.

    Returns the block's outputs at ``x`` (``x`` itself unless ``outputs_of_x``) and at ``y`` ``[T, P, C]``.
    """
    attn = block.attn
    T, S, C = x.shape
    H, D = attn.n_head, attn.head_dim
    if y.dim() == 2:  # the same tokens in every task: one row each through the norm and the projection
        P = y.shape[0]
        qkv = attn.qkv(block.ln_1(torch.cat([x.reshape(T * S, C), y])))
        qkv = torch.cat([qkv[:T * S].view(T, S, -1), qkv[T * S:].expand(T, P, -1)], dim=1)
    else:
        P = y.shape[1]
        qkv = attn.qkv(block.ln_1(torch.cat([x, y], dim=1)))
    # [T, L, 3 H D] -> 3 x [T, H, L, D]
    q, k, v = (t.view(T, S + P, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    if not outputs_of_x:
        q = q[:, :, S:]
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    h = attn.proj(out.transpose(1, 2).reshape(T, -1, H * D))
    h = h + (torch.cat([x, y.expand(T, P, C)], dim=1) if outputs_of_x else y)
    h = h + block.mlp(block.ln_2(h))
    return (h[:, :S], h[:, S:]) if outputs_of_x else (x, h)


# ---------------------------------------------------------------------- token features
class ImageEmbedder(nn.Module):
    """The shared image embedder: 4 × (3×3 conv with stride 2, ReLU), global average pool, linear to ``out_dim``.

    Strided convolutions rather than conv + max-pool: the embedder runs on every support image at full
    resolution, and on CPU the full-resolution max-pool cost more than the whole target CNN
    (``benchmarks/bench_hypertransformer.py``). It reads the task-folded images (``task_folding.fold``) the
    target CNN reads, so one grouped convolution embeds the images of every task.
    """

    def __init__(self, in_channels: int, channels: int, out_dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(in_channels if i == 0 else channels, channels, 3, stride=2, padding=1)
                                    for i in range(NUM_CONV)])
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Folded images ``[N, T, C, H, W]`` → ``[T, N, out_dim]``."""
        h = x
        for conv in self.convs:
            h = folded_conv(h, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding).relu_()
        return self.proj(unfold(h.mean(dim=(-2, -1))))


class ActivationFeatures(nn.Module):
    """Features of a layer's input activations: 3×3 conv (stride 2), ReLU, global average pool; linear for logits.

    The stride halves the cost on the full-resolution input of the first layer; the global pool follows anyway.
    """

    def __init__(self, layer: LayerSpec, out_dim: int) -> None:
        super().__init__()
        channels = layer.in_shape[0]
        if layer.is_conv:
            self.net: nn.Module = nn.Conv2d(channels, out_dim, 3, stride=2, padding=1)
        else:
            self.net = nn.Linear(channels, out_dim)

    def forward(self, h: Tensor) -> Tensor:
        """Task-folded input activations of the layer ``[N, T, C, H, W]`` → ``[T, N, out_dim]``."""
        if isinstance(self.net, nn.Linear):
            return self.net(unfold(h).flatten(2))
        h = folded_conv(h, self.net.weight, self.net.bias, stride=self.net.stride, padding=self.net.padding)
        return unfold(h.relu_().mean(dim=(-2, -1)))


# ---------------------------------------------------------------------- one generated layer
class LayerGenerator(nn.Module):
    """The encoder of one generated layer: support tokens + placeholders in, the layer's weight slices out.

    Args:
        layer: the CNN layer it writes (``out_channels`` slices of ``fan_in + 1`` numbers).
        dims: ``(label_dim, image_dim, activation_dim)``; a token is their concatenation.
        n_layer, n_head, layer_norm: the encoder.
        label_placeholders: add the label embedding of ``k`` to placeholder ``k`` (logits layers).
        feedback: accept the weights of a previous task as extra tokens (the continual HyperTransformer).
    """

    def __init__(self, layer: LayerSpec, dims: tuple[int, int, int], n_layer: int, n_head: int, *,
                 layer_norm: bool = True, label_placeholders: bool = False, feedback: bool = False) -> None:
        super().__init__()
        label_dim, image_dim, activation_dim = dims
        n_embd = label_dim + image_dim + activation_dim
        self.layer, self.label_dim, self.label_placeholders = layer, label_dim, label_placeholders
        self.activation_features = ActivationFeatures(layer, activation_dim)
        self.placeholders = nn.Parameter(torch.randn(layer.out_channels, n_embd))
        self.encoder = Encoder(n_embd, n_head, n_layer, layer_norm)
        self.head = nn.Linear(n_embd, layer.slice_size)
        # generated weights start at He / LeCun scale: the final norm makes each output unit-variance
        gain = 2.0 if layer.is_conv else 1.0
        nn.init.normal_(self.head.weight, std=math.sqrt(gain / (layer.fan_in * n_embd)))
        nn.init.zeros_(self.head.bias)
        self.weight_tokens = nn.Linear(layer.slice_size, n_embd) if feedback else None

    def forward(self, label_tokens: Tensor, image_features: Tensor, activations: Tensor, label_table: Tensor,
                key_mask: Tensor | None = None, previous: Tensor | None = None) -> Tensor:
        """Weight slices ``[T, out_channels, slice_size]``.

        Args:
            label_tokens, image_features: ``[T, M, label_dim]``, ``[T, M, image_dim]`` of the M support images.
            activations: the layer's input activations of those images, task-folded ``[M, T, C, H, W]``.
            label_table: the label embeddings ``[num_labels + 1, label_dim]`` (placeholders of logits layers).
            key_mask: ``[T, M]``, False hides a support token from every other token.
            previous: the previous task's slices of this layer ``[T, out_channels, slice_size]`` (feedback).
        """
        T, M = label_tokens.shape[:2]
        out = self.layer.out_channels
        tokens = torch.cat([label_tokens, image_features, self.activation_features(activations)], dim=-1)
        placeholders = self.placeholders  # the same in every task: [out, n_embd]
        if self.label_placeholders:
            placeholders = placeholders + F.pad(label_table[:out], (0, placeholders.shape[-1] - self.label_dim))
        if previous is not None:
            if self.weight_tokens is None:
                raise ValueError(f"LayerGenerator({self.layer.name}): got previous weights but feedback=False; "
                                 "expected previous=None or a generator built with feedback=True")
            # channel identity rides along
            tokens = torch.cat([tokens, self.weight_tokens(previous) + self.placeholders], dim=1)
        if key_mask is not None:  # weight and placeholder tokens are always visible
            key_mask = torch.cat([key_mask, key_mask.new_ones(T, tokens.shape[1] + out - M)], dim=1)
        return self.head(self.encoder(tokens, placeholders, key_mask))


class WeightGenerator(nn.Module):
    """Generates the target CNN's weights layer by layer from support images (shared by HT and CHT).

    Args:
        cnn: the target network.
        num_labels: labels of one task (the ways); the label table gets one extra "unlabelled" entry.
        generate: ``"all"`` layers or only the ``"logits"`` layer (the conv layers are then meta-learned).
        n_layer, n_head, layer_norm: each layer's encoder.
        label_dim, image_dim, activation_dim: the three parts of a support token.
        embedder_channels: channels of the shared image embedder.
        label_placeholders: the last layer's placeholders carry label embeddings (a logits layer).
        feedback: each layer's encoder also reads the previous task's weights of that layer.
    """

    def __init__(self, cnn: FunctionalCNN, num_labels: int, *, generate: str = "all", n_layer: int = 1,
                 n_head: int = 2, label_dim: int = 16, image_dim: int = 32, activation_dim: int = 16,
                 embedder_channels: int = 16, layer_norm: bool = True, label_placeholders: bool = True,
                 feedback: bool = False) -> None:
        super().__init__()
        one_of("generate", generate, GENERATE, owner="WeightGenerator")
        for name, value in (("n_layer", n_layer), ("n_head", n_head), ("label_dim", label_dim),
                            ("image_dim", image_dim), ("activation_dim", activation_dim),
                            ("embedder_channels", embedder_channels)):
            positive_int(name, value, owner="WeightGenerator")
        n_embd = label_dim + image_dim + activation_dim
        if n_embd % n_head:
            raise ValueError(f"n_head={n_head} must divide the token size label_dim + image_dim + activation_dim = "
                             f"{n_embd}; expected a divisor of {n_embd}")
        self.cnn, self.num_labels, self.generate = cnn, num_labels, generate
        in_channels = cnn.layers[0].in_shape[0]
        self.labels = nn.Embedding(num_labels + 1, label_dim)  # index num_labels = "unlabelled"
        self.embedder = ImageEmbedder(in_channels, embedder_channels, image_dim)
        generated = cnn.layers if generate == "all" else cnn.layers[-1:]
        dims = (label_dim, image_dim, activation_dim)
        self.generators = nn.ModuleDict({
            layer.name: LayerGenerator(layer, dims, n_layer, n_head, layer_norm=layer_norm, feedback=feedback,
                                       label_placeholders=label_placeholders and layer is cnn.layers[-1])
            for layer in generated
        })
        init = cnn.init_params()
        self.shared = nn.ParameterDict({name: nn.Parameter(value) for name, value in init.items()
                                        if name.rsplit("_", 1)[0] not in self.generators})

    @property
    def unlabeled(self) -> int:
        """The label index of an unlabelled support image."""
        return self.num_labels

    def forward(self, x_tokens: Tensor, labels: Tensor, num_labeled: int, *, x_rest: Tensor | None = None,
                token_mask: Tensor | None = None, previous: Params | None = None) -> tuple[Params, Tensor | None]:
        """Generate every task's weights; run ``x_rest`` through the CNN on the way.

        Args:
            x_tokens: images that become tokens ``[T, M, C, H, W]``: the ``num_labeled`` labelled support images
                first (their batch-norm statistics are the CNN's), then any unlabelled ones.
            labels: ``[T, M]`` labels, ``self.unlabeled`` for the unlabelled images.
            x_rest: other images ``[T, R, C, H, W]`` (queries) carried through the layers as they are made.
            token_mask: ``[T, M]``, False hides a token.
            previous: the previous task's weights ``{name: [T, ...]}`` (feedback generators only).

        Returns:
            ``(params, outputs)``: the weights ``{name: [T, ...]}`` and the CNN's outputs on ``x_rest`` ``[T, R,
            num_outputs]`` (None without ``x_rest``).
        """
        T, M = labels.shape
        if num_labeled < 1:
            raise ValueError(f"the HyperTransformer needs at least one labelled support image per task; got "
                             f"{num_labeled} (leave support size 0 out of compare.support_sizes)")
        # the CNN runs task-folded (task_folding.fold) from the images to the logits: examples first, so h[:M]
        # are the token images' activations, and every per-task or shared conv is one grouped convolution
        h = fold(x_tokens if x_rest is None else torch.cat([x_tokens, x_rest], dim=1), channels_last=True)
        label_tokens, image_features = self.labels(labels), self.embedder(h[:M])
        params: Params = {}
        for index, layer in enumerate(self.cnn.layers):
            if layer.name in self.generators:
                prev = None if previous is None else layer.to_slices(previous)
                slices = self.generators[layer.name](label_tokens, image_features, h[:M], self.labels.weight,
                                                     token_mask, prev)
                params.update(layer.from_slices(slices))
            else:
                for key in (f"{layer.name}_weight", f"{layer.name}_bias"):
                    params[key] = self.shared[key].expand(T, *self.shared[key].shape)
            if x_rest is not None or index < len(self.cnn.layers) - 1:  # the logits of the tokens are not needed
                h = self.cnn.folded_block(index, params, h, norm_examples=num_labeled)
        return params, None if x_rest is None else unfold(h[M:])  # the logits of x_rest, [T, R, K]


# ---------------------------------------------------------------------- the learner
class HyperTransformer(Learner):
    """The HyperTransformer as a Learner: support (+ unlabelled) images in, query logits ``[T, Q, num_classes]`` out.

    Args:
        num_classes: the ways of the episodes.
        widths: the target CNN's channels (an int or four ints).
        in_channels, image_size: the images.
        generate: ``"all"`` layers (conv and logits) or ``"logits"`` only.
        n_layer, n_head: transformer layers and heads per generated layer (the paper: unlabelled images help
            only with at least 2 layers).
        label_dim, image_dim, activation_dim, embedder_channels: token parts and the shared image embedder.
        use_unlabeled: read ``episode.x_unlabeled`` as tokens with the "unlabelled" label when present.
        layer_norm: layer norms in the encoders (off only for hand-set constructions).
        strategy: how the CNN batches tasks (``FunctionalCNN``).
    """

    kinds = ("classification",)
    implicit = True  # the weights are written by a forward pass, not fitted by an optimiser

    @classmethod
    def example(cls) -> Example:
        return Example(cls(2, 4, image_size=16, label_dim=4, image_dim=8, activation_dim=4, embedder_channels=4),
                       FewShotImages.example())

    def __init__(self, num_classes: int = 5, widths: int | Sequence[int] = 8, *, in_channels: int = 1,
                 image_size: int = 28, generate: str = "all", n_layer: int = 1, n_head: int = 2,
                 label_dim: int = 16, image_dim: int = 32, activation_dim: int = 16, embedder_channels: int = 16,
                 use_unlabeled: bool = True, layer_norm: bool = True, strategy: str = "auto") -> None:
        super().__init__()
        one_of("generate", generate, GENERATE, owner="HyperTransformer")
        cnn = FunctionalCNN(widths, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                            strategy=strategy)
        self.num_classes, self.use_unlabeled = num_classes, use_unlabeled
        self.generator = WeightGenerator(cnn, num_classes, generate=generate, n_layer=n_layer, n_head=n_head,
                                         label_dim=label_dim, image_dim=image_dim, activation_dim=activation_dim,
                                         embedder_channels=embedder_channels, layer_norm=layer_norm)

    @property
    def cnn(self) -> FunctionalCNN:
        return self.generator.cnn

    def _run(self, episode: Episode, unlabeled_mask: Tensor | None, queries: bool) -> tuple[Params, Tensor | None]:
        """The generated weights, and the query logits when ``queries`` (they ride along the sequential pass)."""
        self.check_episode(episode)
        if episode.num_classes != self.num_classes:
            raise ValueError(f"HyperTransformer: built for {self.num_classes}-way episodes; got num_classes="
                             f"{episode.num_classes!r}; expected num_classes={self.num_classes}")
        x, labels, mask = episode.x_support, episode.y_support, None
        if self.use_unlabeled and episode.x_unlabeled is not None:
            T, U = episode.x_unlabeled.shape[:2]
            x = torch.cat([x, episode.x_unlabeled], dim=1)
            labels = torch.cat([labels, labels.new_full((T, U), self.generator.unlabeled)], dim=1)
            if unlabeled_mask is not None:
                visible = unlabeled_mask.new_ones(T, episode.num_support)
                mask = torch.cat([visible, unlabeled_mask.to(torch.bool)], dim=1)
        return self.generator(x, labels, episode.num_support, x_rest=episode.x_query if queries else None,
                              token_mask=mask)

    def generate(self, episode: Episode, unlabeled_mask: Tensor | None = None) -> Params:
        """The generated CNN weights of every task, ``{name: [T, ...]}`` (shared conv weights expanded to T).

        ``unlabeled_mask`` ``[T, U]``: False hides that unlabelled image from the generator.
        """
        return self._run(episode, unlabeled_mask, queries=False)[0]

    def forward(self, episode: Episode, unlabeled_mask: Tensor | None = None) -> Tensor:
        return self._run(episode, unlabeled_mask, queries=True)[1]


__all__ = ["HyperTransformer", "WeightGenerator", "LayerGenerator", "ImageEmbedder", "ActivationFeatures", "Encoder"]
