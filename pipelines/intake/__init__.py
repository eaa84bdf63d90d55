"""Photo intake: raw phone uploads -> a clean, labelled training set (issue 3).

Public API::

    from pipelines.intake import PhotoInput, IntakeConfig, load_intake_models, prepare_dataset

    config = IntakeConfig(clip_model=preset.clip, crop_size=preset.intake_crop_size)
    models = load_intake_models(config)   # the worker borrows intake_models(config) from its manager
    dataset = prepare_dataset([PhotoInput("p1", data), ...], config, models)
    dataset.training_examples()   # -> list[pipelines.types.TrainingExample]
    dataset.token_spec()          # -> pipelines.types.TokenSpec
    dataset.report                # -> list[PhotoReport], one per photo, input order

Importing this package stays light (Pillow, numpy): the API imports
``pipelines.intake.decode`` and ``pipelines.intake.metadata`` at upload time. Nothing here loads or keeps a model: the
caller passes them in (:class:`IntakeModels`).
"""

from pipelines.intake.config import IntakeConfig
from pipelines.intake.dataset import Dataset, DatasetItem, PhotoInput, PhotoReport
from pipelines.intake.decode import DecodeLimits, PhotoHeader, PhotoRejected, decode_photo, inspect_photo, sniff_format
from pipelines.intake.metadata import strip_metadata
from pipelines.intake.models import IntakeModels, intake_models, load_intake_models
from pipelines.intake.reasons import ReasonCode

__all__ = [
    "Dataset",
    "DatasetItem",
    "DecodeLimits",
    "IntakeConfig",
    "IntakeModels",
    "PhotoHeader",
    "PhotoInput",
    "PhotoRejected",
    "PhotoReport",
    "ReasonCode",
    "decode_photo",
    "inspect_photo",
    "intake_models",
    "load_intake_models",
    "prepare_dataset",
    "sniff_format",
    "strip_metadata",
]


def prepare_dataset(photos, config, models, on_progress=None, should_stop=None):
    """See :func:`pipelines.intake.pipeline.prepare_dataset` (imported on first call)."""
    from pipelines.intake.pipeline import prepare_dataset as run

    return run(photos, config, models, on_progress, should_stop)
