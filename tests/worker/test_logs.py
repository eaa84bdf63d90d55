"""A worker's log is what happened to each job: the ML libraries' routine output is silenced
(weight-loading bars, advisory warnings, MediaPipe's native TF Lite lines), what matters still shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import MODEL_CACHE

SCRIPT = """
import logging, os, sys
quiet = sys.argv[1] == "quiet"
if quiet:
    from core import logs
    logs.quiet_libraries()
    logs.configure("INFO", "json")
import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPModel
from pipelines.vision.faces import load_face_detector
from pipelines.vision.persons import load_person_detector

root = sys.argv[2]
CLIPModel.from_pretrained(root + "/clip")
StableDiffusionPipeline.from_pretrained(root + "/sd", torch_dtype=torch.float32, safety_checker=None)
diffusers_logging.get_logger("diffusers.pipelines.controlnet.pipeline_controlnet").warning(
    "You have 2 ControlNets and you have passed 4 prompts.")
load_face_detector().detect(np.zeros((128, 128, 3), np.uint8), 0.5)
load_person_detector()
os.write(2, b"a native line worth reading\\n")
logging.getLogger("likeness.jobs").warning("a line of ours", extra={"job_id": "j1"})
"""

NOISE = ("Loading weights", "Loading pipeline components", "torch_dtype", "inference_feedback_manager",
         "absl::InitializeLog", "You have 2 ControlNets")


def _run(mode: str) -> str:
    from core.logs import LIBRARY_QUIET_ENV
    from pipelines.models.presets import tiny_dir

    # a clean environment: a test before this one in the same process may have quieted the libraries
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_QUIET_ENV}
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tiny_dir(MODEL_CACHE))], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_library_noise_is_silenced_and_what_matters_still_shows(tiny_preset):
    loud = _run("loud")
    assert sum(noise in loud for noise in NOISE) >= 5, loud  # without it, every job prints all of this
    quiet = _run("quiet")
    assert not [noise for noise in NOISE if noise in quiet], quiet
    assert "a native line worth reading" in quiet
    (ours,) = [json.loads(line) for line in quiet.splitlines() if line.startswith("{")]
    assert ours["msg"] == "a line of ours" and ours["job_id"] == "j1" and ours["level"] == "warning"
