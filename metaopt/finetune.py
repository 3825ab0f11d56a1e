"""Fine-tuning a pretrained ViT with learnable memory (Sandler, Zhmoginov, Vladymyrov, Jackson, CVPR 2022).

The study the ``memory_tokens`` recipe runs after its few-shot comparison (:func:`memory_token_study`, an
``evaluate:`` hook):

1. **Pretrain** a small :class:`~metaopt.learners.vit.ViT` on one image source (rendered samples of
   procedural glyph classes), or load it from the cache: ``<cache_dir>/vit-<key>.pt``, the key a hash of
   every setting that shapes the weights, so a second run (or another recipe) reuses it. Nothing is downloaded.
2. **Fine-tune** it on new datasets (scikit-learn's bundled digits; glyph classes it never saw) three ways with
   the same budget (steps, batch) and a learning rate tuned per way on a validation split: head only,
   memory tokens + head (the backbone frozen), and full fine-tuning; SGD with momentum, gradient clipping and
   a short linear warm-up into a cosine decay, as the paper trains. Test accuracy and trainable parameters.
3. **Non-destructive fine-tuning**: each dataset gets its own class token, memory and head under the
   attention mask; the original model's logits must be bit-identical with and without them, and the tasks,
   fine-tuned separately, run concatenated in one pass with each task's accuracy its own.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt import checkpoints, plotting
from metaopt.checks import one_of, positive_float, positive_int
from metaopt.learners.vit import MemoryViT, TaskTokens, ViT, parameter_count
from metaopt.log import Run
from metaopt.seeds import SeedPlan, item_seed
from metaopt.tasks.images.digits import Digits
from metaopt.tasks.images.glyphs import Glyphs

logger = logging.getLogger(__name__)

MODES = ("head", "memory", "full")
"""The fine-tuning ways compared: the new head alone, memory tokens and the new head, every weight."""
TARGETS = ("digits", "glyphs")
"""The datasets fine-tuned on: the 10 bundled digits, or glyph classes of the held-out split."""


@dataclass(frozen=True)
class Split:
    """A labelled image set: train / validation / test tensors ``[N, C, H, W]`` and labels ``[N]``."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    num_classes: int


def _split(images: Tensor, sizes: tuple[int, int, int]) -> Split:
    """Per-class images ``[C, N, 1, H, W]`` cut into train / val / test of ``sizes`` images per class."""
    classes = images.shape[0]
    labels = torch.arange(classes).unsqueeze(1)
    parts, start = [], 0
    for size in sizes:
        chunk = images[:, start:start + size]
        parts.append((chunk.flatten(0, 1), labels.expand(classes, chunk.shape[1]).flatten()))
        start += size
    return Split(*parts, num_classes=classes)


def target_dataset(name: str, *, image_size: int, classes: int, sizes: tuple[int, int, int], seed: int) -> Split:
    """A dataset to fine-tune on: ``"digits"`` (all 10, bundled with scikit-learn) or ``"glyphs"`` (the first
    ``classes`` classes of the held-out test split, which pretraining never sees)."""
    one_of("target", name, TARGETS, owner="target_dataset")
    generator = torch.Generator().manual_seed(seed)
    if name == "digits":
        source = Digits(size=image_size)
        pools = [source.class_images(split, i) for split in ("train", "val", "test")
                 for i in range(source.num_classes(split))]
        per_class = min(len(p) for p in pools)
        if sum(sizes) > per_class:
            raise ValueError(f"target_dataset: sizes={sizes} need {sum(sizes)} digits per class; the bundled set "
                             f"has {per_class}")
        images = torch.stack([p[torch.randperm(len(p), generator=generator)[:sum(sizes)]] for p in pools])
    else:
        source = Glyphs(size=image_size)
        images = source.sample("test", torch.arange(classes), sum(sizes), generator)
    return _split(images, sizes)


# ---------------------------------------------------------------------- pretraining (cached)
PRETRAIN_SEED_INDEX = 1
"""The pretraining seed is ``item_seed(recipe seed, PRETRAIN_SEED_INDEX)``: the study and
:class:`metaopt.learners.MemoryTokens` agree on it, so they share one cached ViT."""


def canonical_vit(vit: Mapping[str, Any]) -> dict[str, Any]:
    """``vit`` with every :class:`ViT` default filled in (except ``num_classes``), so equal models hash equally."""
    bound = inspect.signature(ViT).bind_partial(**vit)
    bound.apply_defaults()
    return {name: value for name, value in bound.arguments.items() if name != "num_classes"}


def pretrained_vit(vit: Mapping[str, Any], *, classes: int, per_class: int, steps: int, batch_size: int, lr: float,
                   seed: int, cache_dir: str | Path | None) -> tuple[ViT, Path | None, bool]:
    """A ViT pretrained on ``classes`` glyph classes of the train split, from the cache when it is there.

    Returns ``(model, path, cached)``. The training set is ``per_class`` rendered samples of each class
    (rendering is the slow part, so it happens once); AdamW with a one-cycle schedule. The cache file is
    named by a hash of the ViT's settings and the pretraining's, and written atomically; ``cache_dir=None``
    pretrains without caching (``path`` is then None).
    """
    vit = canonical_vit(vit)
    settings = {"vit": vit, "classes": classes, "per_class": per_class, "steps": steps,
                "batch_size": batch_size, "lr": lr, "seed": seed,
                "source": repr(Glyphs(size=vit.get("image_size", 28)))}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = None if cache_dir is None else Path(cache_dir) / f"vit-{key}.pt"
    model = ViT(**vit, num_classes=classes)
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), path, True
    torch.manual_seed(seed)
    model = ViT(**vit, num_classes=classes)
    generator = torch.Generator().manual_seed(seed)
    images = Glyphs(size=model.image_size).sample("train", torch.arange(classes), per_class, generator)
    data = (images.flatten(0, 1), torch.arange(classes).repeat_interleave(per_class))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(data[0]), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(data[0][batch]), data[1][batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    if path is not None:
        checkpoints.save(model.state_dict(), path)
    return model.eval(), path, False


def source_test_set(classes: int, per_class: int, image_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Fresh samples of the pretraining classes (the original task's test set)."""
    images = Glyphs(size=image_size).sample("train", torch.arange(classes), per_class,
                                            torch.Generator().manual_seed(seed))
    return images.flatten(0, 1), torch.arange(classes).repeat_interleave(per_class)


# ---------------------------------------------------------------------- fine-tuning
def _train(parameters: Sequence[nn.Parameter], loss_fn, data: tuple[Tensor, Tensor], *, steps: int,
           batch_size: int, lr: float, seed: int) -> None:
    """SGD with momentum 0.9, gradient clipping at 1, a linear warm-up over the first 10% into a cosine decay."""
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(t, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    x, y = data
    for _ in range(steps):
        batch = torch.randint(len(x), (batch_size,), generator=generator)
        loss = loss_fn(x[batch], y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()


@torch.no_grad()
def accuracy(predict, data: tuple[Tensor, Tensor], chunk: int = 512) -> float:
    """The share of ``data`` that ``predict`` (images -> logits) labels right."""
    x, y = data
    right = sum(int((predict(x[i:i + chunk]).argmax(-1) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    return right / len(x)


def fine_tune(backbone: ViT, mode: str, data: Split, *, memory_tokens: int, steps: int, batch_size: int, lr: float,
              seed: int) -> tuple[MemoryViT, int]:
    """A copy of ``backbone`` fine-tuned on ``data`` in ``mode`` (:data:`MODES`); returns it and how many numbers
    it trained. Memory fine-tuning trains ``memory_tokens`` tokens per layer and the new head."""
    one_of("mode", mode, MODES, owner="fine_tune")
    torch.manual_seed(seed)
    body = copy.deepcopy(backbone)
    body.head = nn.Identity()  # the pretraining head is not part of any fine-tuned model
    model = MemoryViT(body, memory_tokens if mode == "memory" else 0, data.num_classes)
    trained = {"head": ["new_head"], "memory": ["memory", "new_head"], "full": None}[mode]
    for name, p in model.named_parameters():
        p.requires_grad_(trained is None or any(name.startswith(t) for t in trained))
    parameters = [p for p in model.parameters() if p.requires_grad]
    model.train()
    _train(parameters, lambda x, y: F.cross_entropy(model(x), y), data.train, steps=steps, batch_size=batch_size,
           lr=lr, seed=seed)
    return model.eval(), parameter_count(model, trained)


def fine_tune_task(backbone: ViT, data: Split, *, memory_tokens: int, steps: int, batch_size: int, lr: float,
                   seed: int) -> TaskTokens:
    """Non-destructive fine-tuning: a new class token, memory and head for ``data``, the backbone untouched."""
    torch.manual_seed(seed)
    task = backbone.new_task(data.num_classes, memory_tokens)
    backbone.requires_grad_(False)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(backbone.forward_tasks(x, [task])[1][0], y)

    _train(list(task.parameters()), loss, data.train, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    return task


# ---------------------------------------------------------------------- the study (an evaluate hook)
@dataclass(frozen=True)
class Claim:
    """A claim of the paper, what was measured, and whether it holds."""

    text: str
    measured: str
    holds: bool


def memory_token_study(run: Run, seeds: SeedPlan, *, vit: Mapping[str, Any], pretrain: Mapping[str, Any],
                       targets: Sequence[str] = TARGETS, target_classes: int = 20,
                       sizes: Sequence[int] = (30, 10, 20), memory_tokens: int = 4, steps: int = 300,
                       batch_size: int = 64, lrs: Mapping[str, Sequence[float]] | None = None,
                       close_to_full: float = 0.05, cache_dir: str | None = None) -> dict[str, Any]:
    """Head-only vs memory vs full fine-tuning of a pretrained ViT, and non-destructive multi-task fine-tuning.

    Args:
        run, seeds: the run (results, figures, W&B) and its seed plan (given by the pipeline).
        vit: the ViT's settings (:class:`ViT` arguments without ``num_classes``).
        pretrain: ``classes``, ``per_class``, ``steps``, ``batch_size``, ``lr`` of the pretraining on glyph classes.
        targets: datasets to fine-tune on (:data:`TARGETS`); ``target_classes`` glyph classes for ``"glyphs"``.
        sizes: train / validation / test images per class of each target dataset.
        memory_tokens, steps, batch_size: memory tokens per layer, and the budget every way gets.
        lrs: learning rates tried per mode (the best on validation is reported); defaults per mode.
        close_to_full: how far below full fine-tuning memory fine-tuning may stay to count as "close".
        cache_dir: where the pretrained ViT is cached (default: the run folder's ``pretrained/``).

    Returns the measurements and claims (also ``memory_tokens.json`` in the run folder).
    """
    lrs = {"head": [0.1, 0.3], "memory": [0.1, 0.3], "full": [0.01, 0.03]} | dict(lrs or {})
    for mode in MODES:
        [positive_float(f"lrs.{mode}", lr, owner="memory_token_study") for lr in lrs[mode]]
    sizes = tuple(positive_int("sizes", s, owner="memory_token_study") for s in sizes)
    cache = Path(cache_dir) if cache_dir is not None else run.path / "pretrained"
    image_size = int(vit.get("image_size", 28))
    backbone, path, cached = pretrained_vit(vit, seed=item_seed(seeds.seed, PRETRAIN_SEED_INDEX), cache_dir=cache,
                                            **pretrain)
    source_test = source_test_set(pretrain["classes"], 10, image_size, item_seed(seeds.seed, 2))
    results: dict[str, Any] = {"pretrained": {"path": str(path), "cached": cached,
                                              "accuracy": accuracy(backbone, source_test)}}
    logger.info("pretrained ViT (%s, %s): source accuracy %.3f", path, "cached" if cached else "trained now",
                results["pretrained"]["accuracy"])
    datasets = {name: target_dataset(name, image_size=image_size, classes=target_classes, sizes=sizes,
                                     seed=item_seed(seeds.seed, 3 + i)) for i, name in enumerate(targets)}
    seed = item_seed(seeds.seed, 10)
    for name, data in datasets.items():
        per_mode = {}
        for mode in MODES:
            trials = []
            for lr in lrs[mode]:
                model, count = fine_tune(backbone, mode, data, memory_tokens=memory_tokens, steps=steps,
                                         batch_size=batch_size, lr=lr, seed=seed)
                trials.append((accuracy(model, data.val), lr, model, count))
            val, lr, model, count = max(trials, key=lambda t: t[0])
            per_mode[mode] = {"test_accuracy": accuracy(model, data.test), "val_accuracy": val, "lr": lr,
                              "trainable_parameters": count}
        results[name] = per_mode
    results["non_destructive"] = _non_destructive(backbone, datasets, source_test, results, memory_tokens=memory_tokens,
                                                  steps=steps, batch_size=batch_size, seed=seed)
    claims = _claims(results, list(datasets), close_to_full)
    results["claims"] = [asdict(c) for c in claims]
    _report(run, results, list(datasets), claims, [1 / data.num_classes for data in datasets.values()])
    return results


def _non_destructive(backbone: ViT, datasets: Mapping[str, Split], source_test: tuple[Tensor, Tensor],
                     results: Mapping[str, Any], **budget: Any) -> dict[str, Any]:
    """Fine-tune a task per dataset under the mask; compare the original output and the joint pass bit for bit."""
    tasks = {name: fine_tune_task(backbone, data, lr=results[name]["memory"]["lr"], **budget)
             for name, data in datasets.items()}
    every = list(tasks.values())
    with torch.no_grad():
        x = source_test[0]
        alone = backbone(x)
        joint = backbone.forward_tasks(x, every)[0]
    out: dict[str, Any] = {"original_bit_identical": bool(torch.equal(alone, joint)),
                           "original_accuracy": accuracy(backbone, source_test),
                           "original_accuracy_joint": accuracy(lambda v: backbone.forward_tasks(v, every)[0],
                                                               source_test)}
    for index, (name, task) in enumerate(tasks.items()):
        test = datasets[name].test
        separate = accuracy(lambda v, t=task: backbone.forward_tasks(v, [t])[1][0], test)
        together = accuracy(lambda v, i=index: backbone.forward_tasks(v, every)[1][i], test)
        with torch.no_grad():
            exact = torch.equal(backbone.forward_tasks(test[0][:64], [task])[1][0],
                                backbone.forward_tasks(test[0][:64], every)[1][index])
        out[name] = {"separate_accuracy": separate, "joint_accuracy": together, "joint_bit_identical": exact}
    return out


def _claims(results: Mapping[str, Any], names: Sequence[str], close_to_full: float) -> list[Claim]:
    claims = []
    for name in names:
        r = results[name]
        head, memory, full = (r[m]["test_accuracy"] for m in MODES)
        ratio = r["memory"]["trainable_parameters"] / r["full"]["trainable_parameters"]
        claims.append(Claim(f"Sandler et al.: memory tokens beat head-only fine-tuning ({name})",
                            f"memory {memory:.3f} vs head {head:.3f}", memory > head))
        claims.append(Claim(f"Sandler et al.: memory tokens come close to full fine-tuning at a fraction of the "
                            f"trainable parameters ({name}; close = within {close_to_full:.2f})",
                            f"memory {memory:.3f} vs full {full:.3f}; parameters "
                            f"{r['memory']['trainable_parameters']} vs {r['full']['trainable_parameters']} "
                            f"({ratio:.1%})", memory >= full - close_to_full and ratio < 0.5))
    nd = results["non_destructive"]
    claims.append(Claim("Sandler et al.: under the mask the original model's output is unchanged",
                        f"bit-identical {nd['original_bit_identical']}; accuracy {nd['original_accuracy']:.3f} "
                        f"alone, {nd['original_accuracy_joint']:.3f} with every task", nd["original_bit_identical"]))
    exact = all(nd[n]["joint_bit_identical"] and nd[n]["separate_accuracy"] == nd[n]["joint_accuracy"]
                for n in names)
    claims.append(Claim("Sandler et al.: separately fine-tuned tasks run concatenated in one pass, each with its "
                        "own accuracy", "; ".join(f"{n} {nd[n]['separate_accuracy']:.3f} alone / "
                                                  f"{nd[n]['joint_accuracy']:.3f} joint" for n in names), exact))
    return claims


def _report(run: Run, results: Mapping[str, Any], names: Sequence[str], claims: Sequence[Claim],
            chance: Sequence[float]) -> None:
    """Log the table and the claims, write ``memory_tokens.json``, the W&B table and a bar chart (``chance``: each
    dataset's accuracy of guessing)."""
    rows = [[name, mode, results[name][mode]["test_accuracy"], results[name][mode]["trainable_parameters"],
             results[name][mode]["lr"]] for name in names for mode in MODES]
    for row in rows:
        logger.info("fine-tuning %-7s %-7s test accuracy %.3f  trainable parameters %7d  lr %g", *row)
    for claim in claims:
        logger.info("[%s] %s — measured: %s", "holds" if claim.holds else "FAILS", claim.text, claim.measured)
    run.save_json(results, "memory_tokens")
    run.summary({f"memory_tokens/{name}/{mode}": results[name][mode]["test_accuracy"]
                 for name in names for mode in MODES})
    run.log_table("memory_tokens/fine_tuning", ["dataset", "mode", "test_accuracy", "trainable_parameters", "lr"],
                  rows)
    run.save_figure(_figure(results, names, chance), "memory_tokens_fine_tuning")


def _figure(results: Mapping[str, Any], names: Sequence[str], chance: Sequence[float]):
    """Test accuracy per target dataset and fine-tuning mode, as grouped bars with each dataset's chance."""
    fig, (ax,) = plotting.new_figure()
    plotting.bars(ax, names, {f"{mode} ({results[names[0]][mode]['trainable_parameters']} params)":
                              [results[name][mode]["test_accuracy"] for name in names] for mode in MODES},
                  chance=chance)
    ax.set_xlabel("target dataset")
    ax.set_ylabel("test accuracy")
    subtitle = ("test accuracy after fine-tuning with the learning rate best on validation, the same step budget "
                "for every mode (one run each, no interval)")
    return plotting.finish(fig, "fine-tuning a pretrained ViT: head, memory tokens, all weights", subtitle)


__all__ = ["MODES", "TARGETS", "PRETRAIN_SEED_INDEX", "Split", "Claim", "target_dataset", "canonical_vit",
           "pretrained_vit", "source_test_set", "fine_tune", "fine_tune_task", "accuracy", "memory_token_study"]
