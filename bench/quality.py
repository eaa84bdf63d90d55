"""Quality comparison of training strategies, measured every K steps (the published comparison).

    python bench/quality.py PHOTOS_DIR --preset sd15 --class-token girl --device cuda
    python bench/quality.py PHOTOS_DIR --preset tiny --steps 20 --eval-every 10   # mechanics only

Runs staged training (text encoder + U-Net, then U-Net), textual inversion, DreamBooth-style
U-Net-only and whole-model training on the same photos; every ``--eval-every`` steps it
records Image Alignment, Text Alignment (instance token removed), LPIPS and identity
similarity, then writes ``quality.md``, ``quality.csv`` and ``quality.png`` to ``--out``.
Photos are centre-cropped by the trainer; run intake first for real face crops.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RUNS = {
    "staged": {"strategy": "staged"},
    "textual_inversion": {"strategy": "textual_inversion", "token_lr": 5e-3},
    "dreambooth_unet": {"strategy": "unet_only", "token_init": "rare"},
    "whole_model": {"strategy": "whole_model"},
}


def load_photos(folder: Path):
    from PIL import Image, ImageOps

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not paths:
        raise SystemExit(f"no photos in {folder}")
    return [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]


def main(argv=None) -> None:
    from pipelines.eval.harness import EvalConfig, make_eval_callback, write_report
    from pipelines.models.presets import get_preset, with_overrides
    from pipelines.training import TrainConfig, train
    from pipelines.types import TokenSpec, TrainingExample

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", type=Path)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--class-token", default="girl")
    parser.add_argument("--mode", default="lora", choices=("lora", "full"))
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=None, help="default: the trainer's photos x steps_per_photo")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--sampler-steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quality")
    args = parser.parse_args(argv)

    preset = get_preset(args.preset)
    if args.resolution:
        preset = with_overrides(preset, resolution=args.resolution)
    photos = load_photos(args.photos)
    tokens = TokenSpec("<subj>", args.class_token, tuple(f"<bg{i}>" for i in range(len(photos))))
    examples = [TrainingExample(im, f"<bg{i}> <subj> {args.class_token}", photo_id=str(i))
                for i, im in enumerate(photos)]
    eval_config = EvalConfig(every=args.eval_every, images_per_prompt=args.images_per_prompt,
                             num_inference_steps=args.sampler_steps)
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    histories, notes = {}, {}
    for name in args.runs.split(","):
        config = TrainConfig(mode=args.mode, max_train_steps=args.steps, **RUNS[name])
        callback = make_eval_callback(eval_config, photos, preset.clip, preset.resolution, device=device)
        started = time.perf_counter()
        result = train(examples, tokens, config, preset, args.out / "runs" / name, device=device,
                       callbacks=[callback])
        histories[name] = result.metrics.get("eval", [])
        notes[f"{name} wall time"] = f"{time.perf_counter() - started:.1f} s, {result.steps} steps"
        print(f"{name}: {result.steps} steps, final loss {result.metrics['final_loss']:.4f}")
    files = write_report(histories, args.out, title="quality", notes=notes)
    print(files["markdown"].read_text())
    print(f"plot: {files['plot']}")


if __name__ == "__main__":
    main()
