"""Per-subject fine-tuning: ``train(examples, tokens, config, preset, output_dir, base=...)`` -> adapter folder.

Importing this package stays torch-free (the job contract reads :class:`TrainConfig`); the
trainer is imported on first use.
"""

from pipelines.training.config import STRATEGIES, TrainConfig, check_config, plan_stages, total_steps

__all__ = [
    "STRATEGIES",
    "BaseNotRestored",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingState",
    "check_config",
    "check_inputs",
    "plan_stages",
    "total_steps",
    "train",
]

_TRAINER_NAMES = {"TrainCallback", "Trainer", "TrainingState", "TrainResult", "check_inputs", "train"}


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from pipelines.training import trainer

        return getattr(trainer, name)
    if name == "BaseNotRestored":
        from pipelines.training.base import BaseNotRestored

        return BaseNotRestored
    raise AttributeError(name)
