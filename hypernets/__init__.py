"""Hypernetworks: the HyperTransformer and its continual variant, and the target CNN they write weights for.

Imports ``metaopt`` core; ``metaopt`` never imports this package (recipes reach it by import path).
"""

from hypernets.cnn import FunctionalCNN, LayerSpec, TargetCNN
from hypernets.continual import (
    ContinualHyperTransformer,
    ContinualResult,
    evaluate_continual,
    evaluate_sequences,
    split_tasks,
)
from hypernets.hypertransformer import HyperTransformer, WeightGenerator
from hypernets.specificity import specificity, weight_specificity

__all__ = ["FunctionalCNN", "TargetCNN", "LayerSpec", "HyperTransformer", "WeightGenerator",
           "ContinualHyperTransformer", "ContinualResult", "evaluate_continual", "evaluate_sequences", "split_tasks",
           "specificity", "weight_specificity"]
