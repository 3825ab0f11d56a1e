"""Procedural handwriting-like characters, generated on the fly: an unbounded Omniglot stand-in.

A class is a handful of cubic Bézier pen strokes whose control points come from a counter-based
hash of (seed, class id), so the same class id is always the same character without storing
anything. A sample jitters the control points and the stroke width and applies a random affine
pose (rotation, scale, shear, translation) to them, then renders by distance to the polyline of
each stroke with a one-pixel anti-aliased edge. Bézier curves are affine-invariant, so posing the
control points equals warping the drawn curve, without the blur of resampling an image.
"""

from __future__ import annotations

import math

import torch

from metaopt.checks import integer, non_negative_float, non_negative_int, positive_int, sequence_of
from metaopt.seeds import item_seed
from metaopt.tasks.images.source import SPLITS, ImageSource, check_split

MAX_STROKES = 4
STROKE_PROBS = (0.1, 0.35, 0.35, 0.2)  # P(1, 2, 3, 4 strokes)
CURVE_POINTS = 24  # samples per Bézier stroke: spaced within ~2 Gaussian widths even on long strokes
_PARAMS_PER_STROKE = 7
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for 32-bit values in int64, split in halves so nothing overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xor-shift-multiply, as in "lowbias32"), elementwise on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_uniform(keys: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` uniforms in [0, 1) per integer key, a pure function of (seed, key): ``[*B] -> [*B, count]``."""
    stream = hash32(keys.long().unsqueeze(-1) * count + torch.arange(count))
    return hash32(stream ^ hash32(torch.tensor(seed, dtype=torch.long))).double().div(2.0**32).float()


def bezier_basis(points: int) -> torch.Tensor:
    """Cubic Bernstein basis at ``points`` evenly spaced parameters: ``[points, 4]``."""
    t = torch.linspace(0.0, 1.0, points).unsqueeze(-1)
    k = torch.arange(4)
    binomial = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return binomial * t**k * (1 - t) ** (3 - k)


def class_strokes(class_ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The character of each class id ``[*B]``: Bézier control points, active strokes and pen half-width.

    Returns control points ``[*B, S, 4, 2]`` in [-1, 1], active strokes ``[*B, S]``, half-width ``[*B]``.

    Strokes start at a random point or, half the time, where the previous stroke ended (pen strokes
    of handwriting connect); each bends away from its chord by up to 60% of its length on either
    side. The whole glyph is then centred and scaled to span about 70% of the canvas.
    """
    u = hashed_uniform(class_ids, MAX_STROKES * _PARAMS_PER_STROKE + 2, seed)
    stroke_u = u[..., : MAX_STROKES * _PARAMS_PER_STROKE].unflatten(-1, (MAX_STROKES, _PARAMS_PER_STROKE))
    thresholds = torch.tensor(STROKE_PROBS).cumsum(0)[:-1]
    num_strokes = 1 + (u[..., -2:-1] >= thresholds).sum(-1)
    active = torch.arange(MAX_STROKES) < num_strokes.unsqueeze(-1)

    fresh_start = stroke_u[..., 0:2] * 1.2 - 0.6
    angle = stroke_u[..., 2] * 2 * math.pi
    length = 0.5 + 0.7 * stroke_u[..., 3]
    bends = (stroke_u[..., 4:6] - 0.5) * 1.2 * length.unsqueeze(-1)
    connect = stroke_u[..., 6] < 0.5
    direction = torch.stack([angle.cos(), angle.sin()], -1)
    normal = torch.stack([-direction[..., 1], direction[..., 0]], -1)
    starts, ends = [], []
    for s in range(MAX_STROKES):  # the start of stroke s depends on the end of stroke s - 1
        start = fresh_start[..., s, :]
        if s > 0:
            start = torch.where(connect[..., s, None], ends[-1], start)
        starts.append(start)
        ends.append(start + length[..., s, None] * direction[..., s, :])
    start, end = torch.stack(starts, -2), torch.stack(ends, -2)
    chord = end - start
    p1 = start + chord / 3 + bends[..., 0:1] * normal
    p2 = start + 2 * chord / 3 + bends[..., 1:2] * normal
    control = torch.stack([start, p1, p2, end], -2)  # [*B, S, 4, 2]

    # centre and scale the bounding box of the active control points (it bounds the curves)
    masked = control.masked_fill(~active[..., None, None], float("nan"))
    low = masked.flatten(-3, -2).nan_to_num(float("inf")).amin(-2)
    high = masked.flatten(-3, -2).nan_to_num(float("-inf")).amax(-2)
    scale = (1.4 / (high - low).amax(-1).clamp_min(1e-3)).clamp_max(2.5)
    control = (control - ((low + high) / 2)[..., None, None, :]) * scale[..., None, None, None]
    half_width = 0.055 + 0.03 * u[..., -1]
    return control, active, half_width


def random_pose(
    shape: tuple[int, ...], generator: torch.Generator, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine maps ``[*shape, 2, 2]`` and shifts ``[*shape, 2]``.

    At ``strength`` 1: rotation ±8°, scale 0.9–1.08, shear ±0.1, shift ±0.06 (under a pixel);
    the ranges scale with ``strength``.
    """
    u = torch.rand(*shape, 5, generator=generator) * 2 - 1
    angle = math.radians(8.0) * strength * u[..., 0]
    scale = 1.0 + strength * (-0.01 + 0.09 * u[..., 1])
    shear = 0.1 * strength * u[..., 2]
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear_matrix = torch.eye(2).expand(*shape, 2, 2).clone()
    shear_matrix[..., 0, 1] = shear
    matrix = scale[..., None, None] * rotation @ shear_matrix
    return matrix, 0.06 * strength * u[..., 3:5]


def _gaussians(centres: torch.Tensor, coords: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``exp(-(centre - coord)² / 2 sigma²)`` for pixel centres ``[size]`` and samples ``[N, Q]``: ``[N, size, Q]``.

    Exponents are floored at -30: denormal floats would make ``exp`` and ``bmm`` ~20× slower.
    """
    exponent = (centres.view(1, -1, 1) - coords.unsqueeze(1)).square_().mul_(-0.5 / sigma.square())
    return exponent.clamp_min_(-30.0).exp_()


def render_strokes(control: torch.Tensor, active: torch.Tensor, half_width: torch.Tensor, size: int) -> torch.Tensor:
    """Draw strokes into ``[*B, 1, size, size]`` images in [0, 1].

    Args:
        control: Bézier control points ``[*B, S, 4, 2]`` as (x, y) in [-1, 1] (y down, like image rows).
        active: which strokes to draw, ``[*B, S]``.
        half_width: half the pen width in the same units, ``[*B]``.

    Each curve is sampled densely and every sample contributes a Gaussian of width ``sigma``
    weighted by the arc length it stands for, so the sum is ``exp(-d² / 2 sigma²)`` at distance
    ``d`` from a stroke. The Gaussian is separable, so the sum over samples for every pixel is one
    batched matrix product ``[H, Q] @ [Q, W]`` per image instead of a pixel × segment distance
    table. Inverting the profile gives ``d``; ink is 1 inside the pen and falls linearly to 0
    over one pixel at its edge (anti-aliasing). Crossing strokes add up and stay inked.
    """
    batch = control.shape[:-3]
    pixel = 2.0 / size
    curve = bezier_basis(CURVE_POINTS) @ control.reshape(-1, *control.shape[-3:])  # [N, S, P, 2]
    step = (curve[..., 1:, :] - curve[..., :-1, :]).norm(dim=-1)  # [N, S, P-1]
    arc = torch.cat([step[..., :1], step[..., :-1] + step[..., 1:], step[..., -1:]], -1) / 2  # trapezoid weights
    arc = arc * active.reshape(-1, active.shape[-1], 1)
    sigma = (0.8 * half_width.reshape(-1, 1, 1)).clamp_min(0.6 * pixel)  # [N, 1, 1]
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) * pixel - 1.0
    points = curve.flatten(1, 2)  # [N, Q, 2]
    gx, gy = (_gaussians(centres, points[..., axis], sigma) for axis in (0, 1))  # [N, W, Q], [N, H, Q]
    weights = arc.flatten(1).unsqueeze(1) / (math.sqrt(2 * math.pi) * sigma)  # [N, 1, Q]
    profile = torch.bmm(gy * weights, gx.transpose(1, 2)).clamp_(1e-12, 1.0)  # [N, H, W]
    distance = sigma * torch.sqrt(-2.0 * profile.log())
    ink = ((half_width.reshape(-1, 1, 1) + pixel / 2 - distance) / pixel).clamp_(0.0, 1.0)
    return ink.view(*batch, 1, size, size)


class Glyphs(ImageSource):
    """Procedural characters: ``classes`` (train, val, test) distinct classes, grey images ``[1, size, size]``.

    Class ``c`` of a split is the character with global id ``offset(split) + c`` under ``seed``;
    splits never share a character. A sample of a class jitters its control points by ``jitter``
    (standard deviation, in canvas half-widths), its pen width by ±15%, and draws a random affine
    pose scaled by ``pose`` (0 turns posing off). ``class_images`` returns ``samples_per_class``
    fixed samples of a class (its finite view, like Omniglot's 20 drawers).
    """

    def __init__(
        self,
        classes: tuple[int, int, int] = (3200, 800, 800),
        *,
        size: int = 28,
        seed: int = 0,
        jitter: float = 0.025,
        pose: float = 1.0,
        samples_per_class: int = 20,
    ) -> None:
        if not (isinstance(classes, (tuple, list)) and len(classes) == len(SPLITS)):
            raise ValueError(f"Glyphs: classes must be (train, val, test) class counts; got {classes!r}")
        self.classes = sequence_of("classes", classes, positive_int, owner="Glyphs")
        self.size = integer("size", size, owner="Glyphs", low=8)
        self.seed = non_negative_int("seed", seed, owner="Glyphs")
        self.jitter = non_negative_float("jitter", jitter, owner="Glyphs")
        self.pose = non_negative_float("pose", pose, owner="Glyphs")
        self.samples_per_class = positive_int("samples_per_class", samples_per_class, owner="Glyphs")
        self.image_shape = (1, self.size, self.size)

    def num_classes(self, split: str) -> int:
        return self.classes[SPLITS.index(check_split("Glyphs", split))]

    def images_per_class(self, split: str) -> int | None:
        check_split("Glyphs", split)
        return None

    def global_ids(self, split: str, classes: torch.Tensor) -> torch.Tensor:
        """Split-local class ids -> the ids that seed the characters (unique across splits)."""
        offset = sum(self.classes[: SPLITS.index(check_split("Glyphs", split))])
        return classes.long() + offset

    def prototypes(self, split: str, classes: torch.Tensor) -> torch.Tensor:
        """The unjittered, unposed character of each class: ``[*B, 1, size, size]``."""
        control, active, half_width = class_strokes(self.global_ids(split, classes), self.seed)
        return render_strokes(control, active, half_width, self.size)

    def sample(self, split: str, classes: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
        control, active, half_width = class_strokes(self.global_ids(split, classes), self.seed)
        expand = (*classes.shape, per_class)
        control = control.unsqueeze(len(classes.shape)).expand(*expand, *control.shape[-3:])
        active = active.unsqueeze(-2).expand(*expand, MAX_STROKES)
        control = control + self.jitter * torch.randn(control.shape, generator=generator)
        matrix, shift = random_pose(expand, generator, self.pose)
        control = (control @ matrix.transpose(-1, -2)[..., None, :, :]) + shift[..., None, None, :]
        width = half_width.unsqueeze(-1) * (1.0 + 0.15 * (2 * torch.rand(expand, generator=generator) - 1))
        return render_strokes(control, active, width, self.size)

    def class_images(self, split: str, index: int) -> torch.Tensor:
        self._check_class(split, index)
        global_id = int(self.global_ids(split, torch.tensor(index)))
        generator = torch.Generator().manual_seed(item_seed(self.seed, global_id))
        return self.sample(split, torch.tensor([index]), self.samples_per_class, generator)[0]

    def __repr__(self) -> str:
        return f"Glyphs(classes={self.classes}, size={self.size}, seed={self.seed})"


__all__ = ["Glyphs", "hash32", "render_strokes"]
