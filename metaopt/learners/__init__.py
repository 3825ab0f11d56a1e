"""Learners: every one maps an Episode to predictions on its queries."""

from metaopt.learners.base import Example, Learner
from metaopt.learners.boolean_baselines import (
    BooleanAveraging,
    BooleanMLP,
    BooleanNearestNeighbours,
    Elimination,
    GF2Elimination,
    Null,
)
from metaopt.learners.capabilities import Capability, provides
from metaopt.learners.incontext import (
    FrozenLM,
    HyenaLearner,
    LinearSelfAttention,
    LSTMLearner,
    MesaAttention,
    MesaLayer,
    MomentumAttention,
)
from metaopt.learners.inner_loop import InnerLoop
from metaopt.learners.maml import ANIL, FOMAML, MAML, FixedInitGD, MetaSGD, PerParameterStepSizes
from metaopt.learners.memory_tokens import MemoryTokens
from metaopt.learners.mlp_baseline import MLPBaseline
from metaopt.learners.protonet import ProtoNet
from metaopt.learners.regression_baselines import Averaging, Lasso, NearestNeighbours
from metaopt.learners.ridge_variants import AdaptiveRidge, OracleRidge, TunedAdaptiveRidge, TunedRidge
from metaopt.learners.sklearn_baselines import DecisionTreeBaseline, GradientBoostingBaseline
from metaopt.learners.solvers import GradientDescent, LeastSquares, LinearSolver, Ridge
from metaopt.learners.transformer import Transformer
from metaopt.learners.tuned_gd import GDPlusPlus, TunedGDPlusPlus, TunedGradientDescent

__all__ = ["Learner", "Example", "Capability", "provides",
           "LinearSolver", "LeastSquares", "Ridge", "GradientDescent", "Transformer",
           "Lasso", "Averaging", "NearestNeighbours", "DecisionTreeBaseline", "GradientBoostingBaseline",
           "MLPBaseline", "TunedRidge", "AdaptiveRidge", "TunedAdaptiveRidge", "OracleRidge",
           "Null", "BooleanAveraging", "BooleanNearestNeighbours", "Elimination", "GF2Elimination", "BooleanMLP",
           "LinearSelfAttention", "MesaLayer", "MesaAttention", "MomentumAttention", "LSTMLearner", "HyenaLearner",
           "FrozenLM",
           "GDPlusPlus", "TunedGradientDescent", "TunedGDPlusPlus",
           "InnerLoop", "MAML", "FOMAML", "MetaSGD", "ANIL", "FixedInitGD", "PerParameterStepSizes", "ProtoNet",
           "MemoryTokens"]
