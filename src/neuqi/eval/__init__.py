"""Evaluation: GPTQ-convention perplexity, lm-eval zero-shot accuracy, and the result records and reports."""

from .perplexity import PPL_TASKS, default_device, fits_on_device, model_device, perplexity
from .tasks import evaluate_tasks, parse_tasks
from .zero_shot import AVERAGE_METRIC, ZERO_SHOT_TASKS, zero_shot

__all__ = ["AVERAGE_METRIC", "PPL_TASKS", "ZERO_SHOT_TASKS", "default_device", "evaluate_tasks", "fits_on_device",
           "model_device", "parse_tasks", "perplexity", "zero_shot"]
