"""Overrides that shrink a bundled recipe to a run of seconds, keeping its structure.

The recipe smoke tests run every reproduction this way on the CPU, and the GPU check
(``python -m benchmarks gpu``) runs every bundled recipe this way on CUDA in each precision.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from metaopt.pipelines import load

__all__ = ["OPTIMIZER_TINY", "PRIMING_TINY", "TINY", "TRAJECTORIES_TINY", "DISTILLATION_TINY", "shrunk"]

TINY = {
    "name": "tiny",
    "description": "A tiny end-to-end recipe for tests.",
    "progress": False,
    "task": {"_target_": "metaopt.tasks.LinearRegression", "dim": 2},
    "learners": {
        "transformer": {"_target_": "metaopt.learners.Transformer", "x_dim": 2, "max_support": 4,
                        "n_embd": 16, "n_layer": 1, "n_head": 2},
        "least_squares": {"_target_": "metaopt.learners.LeastSquares"},
        "gd": {"_target_": "metaopt.learners.GradientDescent", "steps": 2, "lr": 0.1},
    },
    "train": {"steps": 6, "batch_size": 8, "support": 4, "val_every": 3, "val_tasks": 16, "checkpoint_every": 3,
              "log_every": 1},
    "compare": {"support_sizes": [0, 2, 4], "num_tasks": 32, "bootstrap": 100},
    "claims": [{"text": "LS is exact at k=d", "learner": "least_squares", "k": 2, "below": 1e-4}],
}
"""A complete ``episodes`` recipe (a transformer against least squares and GD on 2-d regression) that runs
end to end, checkpoints and resumes in a few seconds: the CLI and reliability tests write it to a file."""

OPTIMIZER_TINY = [
    "wandb.mode=disabled", "threads=1", "environment.horizon=4", "environment.pretrain_steps=5",
    "environment.hidden=[8]", "meta_train.steps=2", "meta_train.estimator.pairs=1", "evaluation.seeds=1",
    "tuning.seeds=1", "baselines.sgd.lrs=[0.1,1.0]", "baselines.momentum.lrs=[0.1]", "baselines.adam.lrs=[0.01,0.1]",
    "baselines.adam_cosine.lrs=[0.01,0.1]",
]
"""A run of the ``optimizer`` pipeline (recipes/specialized_optimizer.yaml) in about a second."""

TRAJECTORIES_TINY = [
    "wandb.mode=disabled", "threads=1", "train.steps=40", "train.branch_at=20", "train.eval_every=10",
    "train.final_evals=1", "probes.start=2", "probes.batches=2", "probes.batch_size=16", "probes.dims=2",
    "probes.lrs=[0.1,1.0]", "averaging.two_point_far=8", "averaging.two_point_near=2", "averaging.swa_every=2",
    "channels=[4,8]",
]
"""A run of the ``trajectories`` pipeline (recipes/training_trajectories.yaml) in a second or two."""

PRIMING_TINY = [
    "wandb.mode=disabled", "threads=1", "world.entities=8", "world.new_entities=3", "world.documents=64",
    "world.length=16", "model.n_embd=16", "model.n_layer=1", "model.n_head=2", "pretrain.steps=20",
    "pretrain.batch_size=8", "inject.facts_per_category=3", "inject.steps=2", "inject.batch_size=4",
    "inject.thematic_prefixes=2", "retention.facts_per_category=2", "retention.steps=4", "retention.every=2",
]
"""A run of the ``priming`` pipeline (recipes/knowledge_priming.yaml) in a few seconds."""

DISTILLATION_TINY = [
    "wandb.mode=disabled", "threads=1", "data.agents=4", "data.per_agent=8", "data.public=20",
    "data.test_per_class=3", "model.hidden=8", "model.heads=2", "train.rounds=2", "train.steps_per_round=2",
    "train.batch_size=4", "train.public_batch=8", "train.eval_every=1", "study.degree=2",
]
"""A run of the ``distillation`` pipeline (recipes/decentralized_distillation.yaml) in a few seconds."""

TINY_FROZEN_LM = [
    "learners.frozen_lm.world.entities=6", "learners.frozen_lm.world.new_entities=2",
    "learners.frozen_lm.world.documents=16", "learners.frozen_lm.world.length=12",
    "learners.frozen_lm.model.n_embd=8", "learners.frozen_lm.model.n_layer=1", "learners.frozen_lm.model.n_head=2",
    "learners.frozen_lm.pretrain.steps=2", "learners.frozen_lm.pretrain.batch_size=4",
]
"""A fact-world LM of a few numbers pretrained for two steps, for the frozen-LM recipes."""
_EXTRA = {
    # fewer queries per class (the query sizes follow), and one short sequence length for the accuracy matrices
    "continual_hypertransformer": [
        "task.queries=1", "train.query=15", "compare.query=15", "compare.num_tasks=4",
        "evaluate=[{_target_: hypernets.continual.evaluate_sequences, lengths: [3], sequences: 2}]",
    ],
    "hypertransformer": ["evaluate=[{_target_: hypernets.specificity.weight_specificity, episodes: 8}]"],
    # a tiny ViT pretrained for two steps, two fine-tuning steps per way on a few images per class
    "memory_tokens": [
        "evaluate=[{_target_: metaopt.finetune.memory_token_study, vit: {image_size: 28, patch_size: 14, n_embd: 8, "
        "n_layer: 1, n_head: 2}, pretrain: {classes: 4, per_class: 2, steps: 2, batch_size: 4, lr: 0.001}, "
        "target_classes: 3, sizes: [2, 2, 2], steps: 2, batch_size: 4, lrs: {head: [0.1], memory: [0.1], "
        "full: [0.01]}}]",
    ],
    # a tiny fact-world LM pretrained for two steps; the hooks on a few tasks
    "frozen_lm_boolean": [
        *TINY_FROZEN_LM,
        "evaluate=[{_target_: metaopt.analysis.teaching.compare_teaching, teaching: true, support_sizes: [0, 10], "
        "num_tasks: 8, query: 1, claims: [{text: teaching, learner: frozen_lm, k: 10, above: 0.95}]}]",
    ],
    "frozen_lm_nearest_neighbour": [
        *TINY_FROZEN_LM,
        "evaluate=[{_target_: metaopt.analysis.nearest_heads.nearest_example_heads, num_tasks: 4, support: 20, "
        "claims: [{text: a nearest-example head, learner: frozen_lm, above: 1.0}]}]",
    ],
}
"""What some recipes need beyond the common shrinking, by recipe name (later overrides win)."""


def shrunk(recipe: str) -> list[str]:
    """Overrides that keep a recipe's structure but make it run in a second or two."""
    config = load(recipe)
    if config.pipeline == "optimizer":
        return [*OPTIMIZER_TINY, "progress=false"]
    if config.pipeline == "trajectories":
        return [*TRAJECTORIES_TINY, "progress=false"]
    if config.pipeline == "priming":
        return [*PRIMING_TINY, "progress=false"]
    if config.pipeline == "distillation":
        return [*DISTILLATION_TINY, "progress=false"]
    overrides = [
        "threads=1", "progress=false", "wandb.mode=disabled",
        "train.steps=3", "train.batch_size=4", "train.val_every=3", "train.val_tasks=4",
        "train.checkpoint_every=3", "train.log_every=1", "train.warmup_steps=1",
        "compare.num_tasks=8", "compare.bootstrap=10",
    ]
    for name, spec in config.learners.items():
        if "num_tasks" in spec:  # learners that tune themselves on held-out tasks
            overrides.append(f"learners.{name}.num_tasks=16")
        if "train" in spec:
            overrides.append(f"learners.{name}.train.steps=3")
    analyses = []
    for entry in OmegaConf.to_container(config.compare.analysis):
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        entry["num_tasks"] = 2
        analyses.append("{" + ", ".join(f"{k}: {v}" for k, v in entry.items()) + "}")
    if analyses:
        overrides.append(f"compare.analysis=[{', '.join(analyses)}]")
    return [*overrides, *_EXTRA.get(recipe, [])]
