"""Per-subject fine-tuning: ``train(examples, tokens, config, preset, output_dir)`` -> adapter folder."""

from pipelines.training.config import STRATEGIES, TrainConfig, check_config, plan_stages, total_steps
from pipelines.training.trainer import TrainCallback, TrainingState, TrainResult, check_inputs, train

__all__ = [
    "STRATEGIES",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "TrainingState",
    "check_config",
    "check_inputs",
    "plan_stages",
    "total_steps",
    "train",
]
