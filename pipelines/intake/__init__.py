"""Photo intake: raw phone uploads -> a clean, labelled training set (issue 3).

Public API::

    from pipelines.intake import PhotoInput, IntakeConfig, prepare_dataset

    dataset = prepare_dataset([PhotoInput("p1", data), ...], IntakeConfig(clip_model=preset.clip))
    dataset.training_examples()   # -> list[pipelines.types.TrainingExample]
    dataset.token_spec()          # -> pipelines.types.TokenSpec
    dataset.report                # -> list[PhotoReport], one per photo, input order

Importing this package stays light (Pillow, numpy): the API imports
``pipelines.intake.decode`` at upload time. ``prepare_dataset`` loads detectors on
first call and keeps them for the life of the process.
"""

from pipelines.intake.config import IntakeConfig
from pipelines.intake.dataset import Dataset, DatasetItem, PhotoInput, PhotoReport
from pipelines.intake.decode import DecodeLimits, PhotoRejected, decode_photo, encode_clean, sniff_format
from pipelines.intake.reasons import ReasonCode

__all__ = [
    "Dataset",
    "DatasetItem",
    "DecodeLimits",
    "IntakeConfig",
    "PhotoInput",
    "PhotoRejected",
    "PhotoReport",
    "ReasonCode",
    "decode_photo",
    "encode_clean",
    "prepare_dataset",
    "sniff_format",
]


def prepare_dataset(photos, config, on_progress=None, should_stop=None):
    """See :func:`pipelines.intake.pipeline.prepare_dataset` (imported on first call)."""
    from pipelines.intake.pipeline import prepare_dataset as run

    return run(photos, config, on_progress, should_stop)
