"""How gradient updates shape a language model's knowledge (Sun et al. 2025), one concept per module:

  - ``facts``: a generated world of simple facts, its corpus and vocabulary, the facts injected into it;
  - ``language_model``: a small causal LM from the project's transformer blocks, and its cached pretraining;
  - ``priming``: S_mem and S_prime of an injected fact, injection and continued training.

The ``priming`` pipeline (:mod:`metaopt.pipelines.priming`) runs them as one experiment.
"""

from metaopt.dynamics.facts import CATEGORIES, THEMES, Fact, FactWorld, Vocabulary, stepping_stone_text
from metaopt.dynamics.language_model import CausalLM, next_token_log_probs, pretrain
from metaopt.dynamics.priming import (
    PrimingScores,
    inject,
    keep_training,
    keyword_probabilities,
    log_ratio,
    priming_scores,
)

__all__ = [
    "CATEGORIES",
    "THEMES",
    "CausalLM",
    "Fact",
    "FactWorld",
    "PrimingScores",
    "Vocabulary",
    "inject",
    "keep_training",
    "keyword_probabilities",
    "log_ratio",
    "next_token_log_probs",
    "pretrain",
    "priming_scores",
    "stepping_stone_text",
]
