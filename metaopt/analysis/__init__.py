"""Implicit-vs-explicit analysis: which explicit algorithm does an in-context learner run?

One concept per module:
  - ``sensitivity``: query sensitivities ∂ŷ/∂x_q and their cosine / L2 similarity (von Oswald et al. 2023);
  - ``probes``: SPD and ILWD on probe inputs (Akyürek et al. 2023);
  - ``best_gd``: the GD step size and number of steps that best match a learner;
  - ``interpolation``: the loss halfway between a learner and its GD construction (von Oswald et al.);
  - ``finetuning``: Dai et al.'s dual form, ICL vs finetuning of W_K/W_V (SimAOU, SimAM, Rec2FTP);
  - ``suite``: the analyses ``metaopt.compare.compare`` runs by name, which learners qualify for each
    (by capability, ``metaopt.learners.capabilities``), their table lines and plot.
"""

from metaopt.analysis.best_gd import BestGD, best_gd
from metaopt.analysis.finetuning import (
    DualForm,
    DualFormReport,
    DualFormScores,
    dual_form_linear_attention,
    dual_form_scores,
    finetune_keys_values,
    icl_vs_finetuning,
    key_value_parameters,
    split_prompts,
    trace,
    untrained_copy,
)
from metaopt.analysis.interpolation import Interpolation, align_scales, gd_construction, interpolation_losses
from metaopt.analysis.probes import ProbeDifference, probe_difference, probe_inputs, probe_predictions, spd_ilwd
from metaopt.analysis.sensitivity import SensitivitySimilarity, query_sensitivities, sensitivity_similarity
from metaopt.analysis.suite import (
    ANALYSES,
    REGISTRY,
    Analysis,
    AnalysisResults,
    AnalysisSpec,
    format_analysis,
    parse_analyses,
    plot_analysis,
    qualifying,
    run_analyses,
)

__all__ = [
    "ANALYSES",
    "REGISTRY",
    "Analysis",
    "AnalysisResults",
    "AnalysisSpec",
    "parse_analyses",
    "qualifying",
    "run_analyses",
    "format_analysis",
    "plot_analysis",
    "DualForm",
    "DualFormReport",
    "DualFormScores",
    "dual_form_linear_attention",
    "dual_form_scores",
    "finetune_keys_values",
    "icl_vs_finetuning",
    "key_value_parameters",
    "split_prompts",
    "trace",
    "untrained_copy",
    "BestGD",
    "best_gd",
    "Interpolation",
    "align_scales",
    "gd_construction",
    "interpolation_losses",
    "ProbeDifference",
    "probe_difference",
    "probe_inputs",
    "probe_predictions",
    "spd_ilwd",
    "SensitivitySimilarity",
    "query_sensitivities",
    "sensitivity_similarity",
]
