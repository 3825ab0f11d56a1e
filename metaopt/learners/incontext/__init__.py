"""In-context learners (implicit optimisation): sequence models that read the support set as tokens.

Every model here is a ``Learner`` with ``implicit = True``, batched over tasks, with the token format
(``"interleaved"`` or ``"concatenated"``, see ``tokens``) as a setting. Causal models predict every
prefix and every support size in one forward pass (``PrefixLearner``). ``MomentumAttention`` and
``MesaAttention`` also plug into the causal ``Transformer`` (``Transformer(attention="momentum")``).
"""

from metaopt.learners.incontext.frozen_lm import FrozenLM
from metaopt.learners.incontext.hyena import HyenaLearner
from metaopt.learners.incontext.linear_attention import PARAMETERIZATIONS, LinearSelfAttention
from metaopt.learners.incontext.lstm import LSTMLearner
from metaopt.learners.incontext.mesa import MesaAttention, MesaLayer
from metaopt.learners.incontext.momentum import MomentumAttention
from metaopt.learners.incontext.prefix import PrefixLearner
from metaopt.learners.incontext.tokens import TOKEN_FORMATS

__all__ = [
    "TOKEN_FORMATS",
    "PARAMETERIZATIONS",
    "PrefixLearner",
    "LinearSelfAttention",
    "MesaAttention",
    "MesaLayer",
    "MomentumAttention",
    "LSTMLearner",
    "HyenaLearner",
    "FrozenLM",
]
