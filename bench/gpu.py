"""Every GPU benchmark in one go, for a lent H100/H200: one command, one markdown report.

    python bench/gpu.py --out bench/gpu-report.md          # on the GPU machine (about 10 min on an H200)
    python bench/gpu.py --smoke --out /tmp/gpu-smoke.md    # anywhere: the same runs at toy sizes on CPU

Random weights of the real architectures, built on the machine (it cannot download anything):
SD 1.5 (``sd15-random``: U-Net 320/640/1280/1280, CLIP ViT-L/14) and SDXL 1.0 base (``sdxl-full``:
U-Net 2.6 B parameters, CLIP ViT-L + OpenCLIP bigG). What runs, each in its own process with its
own time limit and all within ``--budget-s`` (570 s; a run that fails or overruns is reported as such
and the next one starts):

1. training, 500 staged steps at the family's native resolution (512 / 1024), LoRA and full,
   bf16 mixed precision, no reference loop (``bench/train.py --no-reference``); SDXL full runs last,
   200 steps (its steady per-step time x 500 gives the 500-step figure), to fit the 10 minutes;
2. generation, 16 candidates at native resolution, 25 Euler steps with CFG, LoRA attached, then
   ranking, x2 upscaling, the face-refinement pass's added time per image and template mode
   (``bench/generate.py``);
3. end to end through ``likeness run``'s orchestration on the tiny presets (``bench/e2e.py``):
   the service's own overhead around the models (random tiny weights: not a model timing).

The checkpoint-selection time is reported by ``bench/train.py`` when the trainer keeps snapshots.
The report starts with the date, the device and the torch version; paste it into bench/RESULTS.md.
``--smoke`` runs everything on CPU at toy sizes (a few steps, 64 px): it proves the script works,
not the timings (the CUDA paths, bf16 and SDPA kernels, run only on a GPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    title: str
    argv: tuple[str, ...]
    limit_s: int  # the run is stopped past this, or when the whole set's budget is spent


def gpu_runs() -> list[Run]:
    train, gen, e2e = "bench/train.py", "bench/generate.py", "bench/e2e.py"
    cuda = ("--device", "cuda")
    return [
        Run("SD 1.5 training: 500 staged steps, 512 px, LoRA and full", (
            train, *cuda, "--arch", "sd15-random", "--resolution", "512", "--steps", "500", "--modes", "lora,full",
            "--no-reference"), 150),
        Run("SDXL training: 500 staged steps, 1024 px, LoRA (first: builds sdxl-full once for the rest)", (
            train, *cuda, "--arch", "sdxl-full", "--resolution", "1024", "--steps", "500", "--modes", "lora",
            "--no-reference"), 240),
        Run("SD 1.5 generation: 16 candidates, 512 px, 25 Euler steps + CFG", (
            gen, *cuda, "--arch", "sd15-random", "--n", "16", "--k", "16", "--steps", "25", "--batch-size", "16"), 75),
        Run("SDXL generation: 16 candidates, 1024 px, 25 Euler steps + CFG", (
            gen, *cuda, "--arch", "sdxl-full", "--n", "16", "--k", "16", "--steps", "25", "--batch-size", "8",
            "--no-template"), 75),
        Run("End to end (likeness run orchestration, tiny preset)", (
            e2e, *cuda, "--preset", "tiny", "--n", "16", "--k", "4", "--runs", "2"), 45),
        # Last, on what is left of the 10 minutes: 200 steps (x2.5 of its steady per-step time for 500).
        Run("SDXL training: 200 staged steps, 1024 px, full", (
            train, *cuda, "--arch", "sdxl-full", "--resolution", "1024", "--steps", "200", "--modes", "full",
            "--no-reference"), 180),
    ]


def smoke_runs() -> list[Run]:
    """The same runs at toy sizes on CPU: every code path of the GPU set but CUDA's own."""
    train, gen, e2e = "bench/train.py", "bench/generate.py", "bench/e2e.py"
    cpu = ("--device", "cpu")
    return [
        Run("SD 1.5 training (smoke: tiny, 64 px, 4 steps)", (
            train, *cpu, "--arch", "tiny", "--resolution", "64", "--steps", "4", "--photos", "3",
            "--modes", "lora,full", "--no-reference"), 300),
        Run("SDXL training (smoke: sdxl-small, 64 px, 4 steps)", (
            train, *cpu, "--arch", "sdxl-small", "--resolution", "64", "--steps", "4", "--photos", "3",
            "--modes", "lora,full", "--no-reference"), 300),
        Run("SD 1.5 generation (smoke: tiny, 2 candidates, 2 steps)", (
            gen, *cpu, "--arch", "tiny", "--n", "2", "--k", "1", "--steps", "2", "--batch-size", "2",
            "--template-n", "2", "--template-steps", "4"), 300),
        Run("SDXL generation (smoke: sdxl-small, 64 px, 2 candidates, 2 steps)", (
            gen, *cpu, "--arch", "sdxl-small", "--resolution", "64", "--n", "2", "--k", "1", "--steps", "2",
            "--batch-size", "2", "--no-template"), 300),
        Run("End to end (smoke: tiny preset)", (
            e2e, *cpu, "--preset", "tiny", "--photos", "5", "--n", "2", "--k", "1", "--train-steps", "10",
            "--steps", "2", "--runs", "1"), 300),
    ]


def device_line(smoke: bool) -> str:
    import torch

    if not smoke and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        memory = f"{props.total_memory / 2**30:.0f} GiB"
        return f"{props.name}, {memory}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def markdown_tables(output: str) -> str:
    """The lines of a run's output worth pasting: its markdown tables and the lines describing them;
    a run that prints plain-text tables (``bench/e2e.py``) is kept whole, as a code block."""
    lines = output.splitlines()
    if not any(line.startswith("|") for line in lines):
        return "```\n" + output.strip()[-4000:] + "\n```"
    keep = [line for line in lines if line.startswith("|") or line.startswith(("device=", "Whole-process"))]
    return "\n".join(keep)


def run_one(run: Run, env: dict[str, str]) -> tuple[str, float, str]:
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *run.argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=run.limit_s)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return f"stopped after {run.limit_s} s", time.perf_counter() - start, partial
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return f"failed (exit {done.returncode})", wall, done.stdout + "\n" + done.stderr[-3000:]
    return "ok", wall, done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU: proves the script, not the timings")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu-report.md")
    parser.add_argument("--only", default=None, help="run only the runs whose title contains this text")
    parser.add_argument("--budget-s", type=int, default=570,
                        help="wall time for the whole set (a device lends 10 minutes a command); a run gets at most "
                             "what is left")
    args = parser.parse_args(argv)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    runs = smoke_runs() if args.smoke else gpu_runs()
    if args.only:
        runs = [r for r in runs if args.only.lower() in r.title.lower()]
    report = [f"## GPU benchmark{' (smoke: CPU, toy sizes; not timings)' if args.smoke else ''}",
              "", f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
              f"- device: {device_line(args.smoke)}",
              f"- command: `python bench/gpu.py{' --smoke' if args.smoke else ''}`",
              "- weights: random, with the real architectures' shapes (nothing downloaded)", ""]
    summary = ["| run | status | wall s |", "|---|---|---:|"]
    sections = []
    failed = 0
    deadline = time.monotonic() + (args.budget_s if not args.smoke else 10 * args.budget_s)
    for run in runs:
        print(f"== {run.title}", flush=True)
        left = int(deadline - time.monotonic())
        if left < 20:
            summary.append(f"| {run.title} | not run: the {args.budget_s} s budget was spent | 0 |")
            failed += 1
            continue
        status, wall, output = run_one(replace(run, limit_s=min(run.limit_s, left)), env)
        failed += status != "ok"
        print(f"   {status} in {wall:.0f} s", flush=True)
        summary.append(f"| {run.title} | {status} | {wall:.0f} |")
        body = markdown_tables(output) if status == "ok" else "```\n" + output.strip()[-4000:] + "\n```"
        sections += [f"### {run.title}", "", f"`python {' '.join(run.argv)}`", "", body or "(no table)", ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report + summary + [""] + sections) + "\n")  # written after every run
    print(f"report: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
