"""Teacher-signal analysis (spec section 6); re-exports the diversity metrics (`mopd_jax.diversity`).

Numpy only; matplotlib is imported lazily by the report's plotting functions.
"""

from mopd_jax.diversity import (
    Diversity,
    distinct_n,
    edit_similarity,
    group_diversity,
    jaccard_similarity,
    mean_diversity,
)
from mopd_jax.analysis.report import (
    AnalysisSummary,
    ReportPaths,
    load_summary,
    markdown_report,
    summarize_conditions,
    summary_from_dict,
    summary_to_dict,
    write_report,
)
from mopd_jax.analysis.stats import (
    METRICS,
    SUBSETS,
    ConditionSummary,
    MeanCI,
    PromptRecord,
    PromptStats,
    SubsetSummary,
    bootstrap_mean_ci,
    kendall_tau_b,
    paired_difference_ci,
    pairwise_accuracy,
    pearson,
    point_biserial,
    prompt_stats,
    rankdata,
    spearman,
    success_auc,
    summarize_condition,
    top1_hit,
)
