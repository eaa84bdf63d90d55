"""Intake throughput: 20 phone-sized (12 MP) JPEG photos through ``prepare_dataset`` on CPU.

    python bench/intake.py [--photos 20] [--megapixels 12]

Uses the bundled detectors (BlazePose, BlazeFace, dlib identity, selfie segmentation)
and the tiny CLIP. Photos are the two public-domain test photos, upscaled to 4000x3000,
mirrored and rotated so they are distinct, encoded as JPEG. Reports a cold run (models
load, as a worker's first borrow does) and a warm run (a worker whose model manager
already holds them), photos/s and peak RSS.
Target on the 2-core dev machine: warm run <= 10 s, peak RSS <= 2 GB.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_photos(count: int, megapixels: float) -> list:
    import matplotlib.cbook
    from PIL import Image
    from skimage import data

    from pipelines.intake import PhotoInput

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        grace = Image.open(io.BytesIO(f.read())).convert("RGB")
    astronaut = Image.fromarray(data.astronaut())
    height = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    width = height * 4 // 3
    photos = []
    for i in range(count):
        source = grace if i % 10 == 9 else astronaut
        angle = (-20, -15, -10, -5, 0, 5, 10, 15, 20)[i % 9]
        subject = source.resize((height * source.width // source.height, height), Image.Resampling.BICUBIC)
        if (i // 9) % 2:
            subject = subject.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        subject = subject.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(90, 90, 90))
        canvas = Image.new("RGB", (width, height), (90 + i, 90, 90))
        canvas.paste(subject, ((width - subject.width) // 2, 0))
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=90)
        photos.append(PhotoInput(f"p{i:02d}", buf.getvalue()))
    return photos


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--megapixels", type=float, default=12.0)
    args = parser.parse_args()

    from pipelines.intake import IntakeConfig, intake_models, prepare_dataset
    from pipelines.models.presets import get_preset
    from worker.models import ModelManager

    default_cache = Path(__file__).resolve().parent.parent / ".likeness" / "test-models"
    preset = get_preset("tiny", Path(os.environ.get("LIKENESS_TEST_MODEL_CACHE", default_cache)))
    photos = make_photos(args.photos, args.megapixels)
    size_mb = sum(len(p.data) for p in photos) / 2**20
    print(f"{len(photos)} photos of {args.megapixels:g} MP, {size_mb:.1f} MiB of JPEG; "
          f"RSS before: {peak_rss_mb():.0f} MB")
    config = IntakeConfig(clip_model=preset.clip, min_photos=1)
    manager = ModelManager()  # the worker's: loads on the first borrow, keeps the models

    for label in ("cold (loads models)", "warm"):
        start = time.perf_counter()
        with manager.borrow(intake_models(config)) as models:
            dataset = prepare_dataset(photos, config, models)
        wall = time.perf_counter() - start
        accepted = sum(r.accepted for r in dataset.report)
        print(
            f"{label:>20}: {wall:6.2f} s  {len(photos) / wall:5.2f} photos/s  "
            f"accepted {accepted}/{len(photos)}  class {dataset.class_token!r}  peak RSS {peak_rss_mb():.0f} MB"
        )


if __name__ == "__main__":
    main()
