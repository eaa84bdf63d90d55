"""End-to-end timing: 10 photos -> intake -> training -> 32 candidates -> top 8 upscaled x2.

Runs the pipeline functions the workers run (``worker.local.run_local``) twice with one model
manager, as a worker runs two jobs: the first run loads every model (its "model load" row),
the second finds them loaded. Prints wall time per stage with its share of the total, so the
next bottleneck is obvious.

    python bench/e2e.py                                  # tiny preset on CPU (images are noise)
    python bench/e2e.py --preset sd15 --device cuda      # real SD 1.5 weights (models pull first)
    python bench/e2e.py --n 8 --k 2 --train-steps 10     # a quick smoke run
    python bench/e2e.py --no-selection --no-face-refine  # the stages an older build had, to compare with it
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("intake", "caching", "training:stage1", "training:stage2", "generating", "refining", "ranking", "upscaling",
          "delivering")


def write_photos(folder: Path, count: int) -> None:
    """``count`` distinct photos of one person (Grace Hopper, public domain: mirrored and rotated)."""
    import matplotlib.cbook
    from PIL import Image

    from tests.pipelines.intake.conftest import person_variants

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(io.BytesIO(f.read())).convert("RGB")
    for i, variant in enumerate(person_variants(photo, count)):
        variant.save(folder / f"photo_{i:02d}.jpg", quality=92)


def table(timings: dict[str, float], extra: dict[str, float]) -> str:
    total = sum(timings.values())
    lines = [f"{'stage':<18}{'seconds':>10}{'share':>9}", "-" * 37]
    for stage in [s for s in STAGES if s in timings] + [s for s in timings if s not in STAGES]:
        lines.append(f"{stage:<18}{timings[stage]:>10.2f}{100 * timings[stage] / total:>8.1f}%")
    lines += ["-" * 37, f"{'total':<18}{total:>10.2f}{100.0:>8.1f}%"]
    lines += [f"{name:<18}{value:>10.2f}  (not in total)" for name, value in extra.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--photos", type=int, default=10)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--style", default="studio_headshot")
    parser.add_argument("--train-steps", type=int, default=None, help="default: the preset's (tiny: 10 per photo)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the style's)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: LIKENESS_MODEL_CACHE_DIR)")
    parser.add_argument("--no-selection", action="store_true", help="keep the finished adapter (no selecting stage)")
    parser.add_argument("--no-face-refine", action="store_true", help="no face-refinement pass (no refining stage)")
    parser.add_argument("--runs", type=int, default=2, help="jobs run one after the other on one warm manager")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    from core.config import get_settings
    from likeness.contract.requests import GenerateRequest, TrainRequest
    from worker.local import LocalRunConfig, StageTimer, run_local
    from worker.models import ModelManager

    cache_dir = args.cache_dir or get_settings().resolved_model_cache_dir
    manager = ModelManager()  # one worker process: models stay loaded between its jobs
    config = LocalRunConfig(
        train=TrainRequest(steps=args.train_steps, select_checkpoint=False if args.no_selection else None),
        generate=GenerateRequest(style=args.style, n=args.n, k=args.k, steps=args.steps, upscale=2,
                                 face_refine="off" if args.no_face_refine else "auto"),
        preset=args.preset, device=args.device,
    )
    figures = []
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="likeness-bench-") as tmp:
            photos, out = Path(tmp) / "photos", Path(tmp) / "out"
            photos.mkdir()
            write_photos(photos, args.photos)
            timer = StageTimer()
            loads_before = manager.snapshot()["load_seconds"]
            start = time.perf_counter()
            report = run_local(photos, out, config, cache_dir, timer=timer, manager=manager)
            wall_s = time.perf_counter() - start
        load_s = manager.snapshot()["load_seconds"] - loads_before
        timings = timer.durations()
        print(f"\njob {run}: preset {args.preset} on {args.device}: {args.photos} photos -> "
              f"{report['training'].get('steps')} training steps -> {args.n} candidates -> "
              f"{len(report['candidates'])} delivered (x2)")
        print(table(timings, {"model load (in stages)": load_s,
                              "trainer's own load": report["training"].get("load_s", 0.0),
                              "wall (measured)": wall_s}))
        figures.append({"stages_s": timings, "model_load_s": load_s, "wall_s": wall_s,
                        "trainer_load_s": report["training"].get("load_s"), "delivered": len(report["candidates"])})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": figures},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
