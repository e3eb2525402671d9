"""Evaluation: metric registry (pyiqa, imported only when a metric is computed), scoring, result tables.

python -m pure.eval --pred restored/ --gt RealSR/gt --metrics psnr,ssim,lpips --out results/ --set realsr
python -m pure.eval.prepare realsr "RealSR(V3)" RealSR   # raw test set -> StableSR centre crops gt/ + lq/
"""

from pure.eval.metrics import (
    FULL_REFERENCE,
    METRICS,
    NO_REFERENCE,
    MetricBackend,
    MetricSpec,
    MetricUnavailable,
    PyiqaBackend,
    get_metric,
    parse_metrics,
)
from pure.eval.reported import REPORTED
from pure.eval.score import EvalError, Pair, check_sizes, evaluate, format_table, pair_images

__all__ = [
    "FULL_REFERENCE",
    "METRICS",
    "NO_REFERENCE",
    "REPORTED",
    "EvalError",
    "MetricBackend",
    "MetricSpec",
    "MetricUnavailable",
    "Pair",
    "PyiqaBackend",
    "check_sizes",
    "evaluate",
    "format_table",
    "get_metric",
    "pair_images",
    "parse_metrics",
]
