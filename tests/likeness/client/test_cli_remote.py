"""The CLI's remote commands go through the client: ``likeness jobs wait`` and ``likeness adapters download``."""

from __future__ import annotations

import zipfile

import httpx
import pytest
from typer.testing import CliRunner

from likeness.client import Client
from likeness_cli import main as cli
from tests.app.helpers import subject_with_photo
from tests.app.test_adapters import _stored_adapter, kohya_zip_bytes
from tests.app.test_tenancy_and_deletion import _seed_results
from tests.likeness.client.test_client import FAST, InProcess


@pytest.fixture
def remote(client_a, monkeypatch):
    """The commands' client, reaching the app in-process; records the --api/--key it was given."""
    given = []

    def make(api, key):  # noqa: ANN001
        given.append((api, key))
        return Client(api_key=key or client_a.key, retry=FAST,
                      http=httpx.Client(base_url="http://testserver", transport=InProcess(client_a.http)))

    monkeypatch.setattr(cli, "_remote", make)
    return given


def test_jobs_wait_shows_progress_and_exits_by_outcome(client_a, store, remote):
    subject_id = subject_with_photo(client_a)
    job_id, _ = _seed_results(subject_id, client_a.id, store)  # a finished generation
    done = CliRunner().invoke(cli.app, ["jobs", "wait", job_id, "--api", "http://x", "--key", client_a.key])
    assert done.exit_code == 0, done.output
    assert "100.0%" in done.output and f"job {job_id} (generate) succeeded" in done.output
    assert remote == [("http://x", client_a.key)]

    train_id = client_a.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    client_a.post(f"/v1/jobs/{train_id}/cancel")
    canceled = CliRunner().invoke(cli.app, ["jobs", "wait", train_id])
    assert canceled.exit_code == 1 and "canceled" in str(canceled.exception)

    missing = CliRunner().invoke(cli.app, ["jobs", "wait", "no-such-job"])
    assert missing.exit_code == 1 and missing.exception.code == "not_found"


def test_adapters_download_writes_the_file(client_a, store, remote, tmp_path):
    subject_id = subject_with_photo(client_a)
    files = _stored_adapter(subject_id, store)
    result = CliRunner().invoke(cli.app, ["adapters", "download", subject_id, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*.zip")
    with zipfile.ZipFile(path) as archive:
        assert set(archive.namelist()) == set(files)
    kohya = CliRunner().invoke(cli.app, ["adapters", "download", subject_id, "--format", "kohya",
                                         "--out", str(tmp_path / "a1111.zip")])
    assert kohya.exit_code == 0 and (tmp_path / "a1111.zip").read_bytes() == kohya_zip_bytes()
    # it says what it wrote: the LoRA, the token's embedding and the prompting notes
    assert "likeness-1a2b3c4d-v1.safetensors  the LoRA" in kohya.output
    assert "embeddings/likeness-1a2b3c4d-v1-subj.safetensors  a learned token" in kohya.output
    assert "HOW-TO-PROMPT.txt" in kohya.output
    into = CliRunner().invoke(cli.app, ["adapters", "download", subject_id, "--out", f"{tmp_path / 'new'}/"])
    assert into.exit_code == 0, into.output
    assert (tmp_path / "new").is_dir() and len(list((tmp_path / "new").glob("*.zip"))) == 1  # a folder, as spelt


def test_remote_commands_say_what_is_missing(monkeypatch):
    import subprocess
    import sys

    from tests.integration.conftest import clean_environ

    result = subprocess.run([sys.executable, "-m", "likeness", "jobs", "wait", "j1"], capture_output=True, text=True,
                            env=clean_environ(), timeout=120)
    assert result.returncode == 1 and "LIKENESS_API_URL" in result.stderr and "Traceback" not in result.stderr
