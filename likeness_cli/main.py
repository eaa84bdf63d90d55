"""``likeness`` command line: serve, worker, migrate, create-client, models, run.

Errors print one human line and exit non-zero; ``--debug`` shows the traceback.
A command imports what only it needs inside itself: the optional extras (the database, queue and
API of ``api``; the image stack and torch of ``worker``; aiogram of ``bot``), so a client-only install
(``pip install likeness``) runs the remote commands, and the settings, client and request models
(pydantic-settings, httpx: ~0.5 s), so ``likeness --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from core.private_files import private_dir, private_umask
from likeness.contract.plan import Queue
from likeness_cli.health import health_app
from pipelines.errors import DatasetRejected, PipelineError
from worker.weights import check, pull

app = typer.Typer(help="Likeness: photos of a person in, ranked portraits out.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="Model weights of a preset: prefetch and check.", no_args_is_help=True)
app.add_typer(models_app, name="models")
adapters_app = typer.Typer(help="Trained adapters: download from the service, convert for other tools.",
                           no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
jobs_app = typer.Typer(help="Jobs of a running service (remote, through the Python client).", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(health_app, name="health")

console = Console()
err = Console(stderr=True)
_state = {"debug": False}


class CliError(Exception):
    """An error the user can act on: printed as one line."""


class Role(str, Enum):
    app = "app"
    bot = "bot"
    admin = "admin"


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug
    if debug:
        import logging

        logging.basicConfig(level=logging.INFO)


def _settings():
    from core.config import get_settings

    return get_settings()


# ---- database ----------------------------------------------------------------------------------------------


@app.command()
def migrate(
    down: Annotated[bool, typer.Option("--down", help="Drop every table (downgrade to base).")] = False,
) -> None:
    """Create or upgrade the database schema (or remove it with --down)."""
    from core.db.migrate import downgrade_to_base, upgrade_to_head

    settings = _settings()
    if down:
        downgrade_to_base()
        console.print(f"database downgraded to base: {_safe_url(settings.resolved_database_url)}")
    else:
        upgrade_to_head()
        console.print(f"database at head: {_safe_url(settings.resolved_database_url)}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _create_client(name: str, role: str) -> str:
    """Create a client; returns its API key (only its hash is stored)."""
    from app.services.clients import create_client as create
    from core.db.uow import UnitOfWork

    with UnitOfWork() as uow:
        _, key = create(uow.session, name, role)
    return key


@app.command("create-client")
def create_client(
    name: str,
    role: Annotated[Role, typer.Option("--role", help="app | bot | admin")] = Role.app,
) -> None:
    """Create an API client and print its key (shown once; only a hash is stored)."""
    key = _create_client(name, role.value)
    console.print(f"client [bold]{name}[/] ({role.value}) created. API key (shown once):")
    print(key)


# ---- processes ---------------------------------------------------------------------------------------------


def worker_command(queues: list[str], concurrency: int, settings, loglevel: str = "info", tag: str = "") -> list[str]:
    names = ",".join(settings.queue(q) for q in queues)
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", names,
            "--concurrency", str(concurrency), "--loglevel", loglevel, "--without-gossip", "--without-mingle",
            "-n", f"likeness-{'-'.join(queues)}{tag}-{os.getpid()}@%h"]


@app.command()
def worker(
    queues: Annotated[str, typer.Option("--queues", "-q", help="Comma-separated: gpu, cpu.")] = "gpu,cpu",
    concurrency: Annotated[int | None, typer.Option(help="Default: 1 when serving gpu, else CPU count.")] = None,
    loglevel: str = "info",
    gpus: Annotated[str | None, typer.Option(
        help="all | 0,1,...: one worker process per GPU (each sees only its device: its own models and memory "
             "budget, one job at a time).")] = None,
) -> None:
    """Start a Celery worker on the given queues (GPU workers run one job at a time)."""
    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = set(names) - set(Queue)
    if unknown or not names:
        raise CliError(f"unknown queue(s) {sorted(unknown)}; use gpu and/or cpu")
    devices = None
    if gpus is not None:
        from likeness_cli.gpus import GpuSpecError, parse_gpus

        try:
            devices = parse_gpus(gpus)
        except GpuSpecError as exc:
            raise CliError(str(exc)) from None
    settings = _settings()
    private_umask()  # the files a worker writes (embedded database and broker, blobs, adapter copies) stay private
    if settings.embedded:  # its own SQLite database, as `likeness serve` prepares it (distributed: `likeness migrate`)
        from core.db.migrate import upgrade_to_head

        private_dir(settings.data_dir)
        upgrade_to_head()
    if devices is not None:
        from likeness_cli.gpus import per_gpu_children, supervise

        console.print(f"starting {len(devices)} worker(s), one per GPU: {', '.join(devices)}")
        code = supervise(per_gpu_children(devices, lambda d: worker_command(names, 1, settings, loglevel, f"-gpu{d}")))
        raise typer.Exit(code)
    if concurrency is None:
        concurrency = 1 if Queue.GPU in names else (os.cpu_count() or 1)
    cmd = worker_command(names, concurrency, settings, loglevel)
    os.execv(sys.executable, cmd)


@app.command()
def beat(loglevel: str = "info") -> None:
    """Run Celery beat: sends the scheduled retention purge to the workers (distributed mode; run one)."""
    settings = _settings()
    if settings.embedded:
        raise CliError("embedded mode needs no beat: the worker started by `likeness serve` purges on its own")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat", "--loglevel", loglevel,
           "--schedule", str((settings.data_dir / "celerybeat-schedule").resolve())]
    os.execv(sys.executable, cmd)


@app.command()
def purge() -> None:
    """Delete now what the clients' retention says is due (what the scheduled purge does)."""
    from core.retention import purge_expired

    report = purge_expired(_settings())
    console.print("deleted: " + ", ".join(f"{n} {kind}" for kind, n in report.as_dict().items()))


def _admin_key(settings) -> tuple[str, bool]:
    """The embedded admin key: created once and kept under data_dir (mode 600)."""
    path = settings.data_dir / "admin_api_key"
    if path.exists():
        return path.read_text().strip(), False
    key = settings.bootstrap_admin_key or _create_client("admin", "admin")
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key, True


def api_command(settings, host: str, port: int) -> list[str]:
    """The uvicorn command of the API; forwarded headers believed only from LIKENESS_FORWARDED_ALLOW_IPS."""
    from app.main import proxy_args

    return [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", host, "--port", str(port),
            "--log-level", "warning", *proxy_args(settings)]


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Default: LIKENESS_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: LIKENESS_PORT.")] = None,
    embedded_worker: Annotated[bool, typer.Option("--worker/--no-worker",
                                                  help="Also start local workers: one for each queue.")] = True,
    cpu_concurrency: Annotated[int, typer.Option(
        min=1, help="Tasks the cpu-queue worker (intake, webhooks) runs at once, beside the gpu-queue worker "
                    "(each loads the intake models).")] = 1,
) -> None:
    """Run the API (and, by default, local workers): migrations first, Ctrl-C stops them all.

    The gpu queue (training, generation) and the cpu queue (intake, webhooks) get a worker each,
    so a long training never holds up another client's intake or a cancel's webhook.
    """
    settings = _settings()
    host, port = host or settings.host, port or settings.port
    _check_port_free(host, port)
    preset = _checked_preset(settings.model_preset, settings)
    console.print(_preset_banner(settings.model_preset, preset), highlight=False)
    os.environ["LIKENESS_MODEL_PRESET"] = preset  # the API and the workers use the preset resolved here
    private_umask()  # the API's and workers' files (database, broker, blobs, keys) are the operator's alone
    private_dir(settings.data_dir)
    from core.db.migrate import upgrade_to_head

    upgrade_to_head()
    key, created = _admin_key(settings)
    children: list[subprocess.Popen] = []
    # `docker stop`, systemd and kill send SIGTERM: stop the children as on Ctrl-C, never orphan them.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if embedded_worker:
            children.append(subprocess.Popen(worker_command([Queue.GPU], 1, settings, "warning")))
            children.append(subprocess.Popen(worker_command([Queue.CPU], cpu_concurrency, settings, "warning")))
        api = subprocess.Popen(api_command(settings, host, port))
        children.append(api)
        url = f"http://{host}:{port}"
        core = list(children)
        _wait_listening(api, host, port)
        if os.environ.get("LIKENESS_TELEGRAM_TOKEN"):  # embedded: the Telegram bot runs beside the API
            children.append(_start_bot(settings, url))
        console.print(f"Likeness listening on [bold]{url}[/]  (API docs: {url}/docs)")
        console.print(f"admin dashboard: [bold]{url}/admin[/]  (log in with the admin API key)")
        mode = "embedded" if settings.embedded else "distributed"
        console.print(f"mode: {mode}, data: {settings.data_dir.resolve()}, preset: {preset}")
        console.print(_secret_banner(settings), soft_wrap=True)
        if created:
            console.print("admin API key (created now, kept in data_dir/admin_api_key):")
            print(key, flush=True)
        else:
            console.print(f"admin API key: see {settings.data_dir.resolve() / 'admin_api_key'}")
        bot_told = False
        while all(child.poll() is None for child in core):
            if len(children) > len(core) and children[-1].poll() is not None and not bot_told:
                err.print("[yellow]the Telegram bot stopped; see its log above (the API keeps running)[/]")
                bot_told = True
            time.sleep(0.5)
        raise CliError("a service process exited unexpectedly; see its log above")
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        _stop(children)


def _checked_preset(name: str, settings) -> str:
    """``name`` (``auto`` resolved) once its weights are known to be here: a missing one is one line now,
    with the command that fetches it, rather than hub retries inside the first job."""
    from pipelines.models.weights import require_weights, resolve_preset

    preset = resolve_preset(name, settings.resolved_model_cache_dir)
    require_weights(preset, settings.resolved_model_cache_dir)
    return preset


def _preset_banner(asked: str, preset: str) -> str:
    from pipelines.models.presets import TINY_PRESETS

    if preset in TINY_PRESETS:
        why = " (auto: no real weights here; `likeness models pull --preset sd15` fetches them)" if asked == "auto" \
            else ""
        return f"model preset: {preset} - random weights, its images are noise{why}"
    return f"model preset: {preset}" + (" (auto: its weights are on this machine)" if asked == "auto" else "")


def _check_port_free(host: str, port: int) -> None:
    """One line and a non-zero exit when another process holds the port (before anything starts)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: only a listener blocks it
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another `likeness serve`? "
                           "choose a port with --port or LIKENESS_PORT)") from None


def _wait_listening(api: subprocess.Popen, host: str, port: int, timeout_s: float = 120.0) -> None:
    """Until the API answers ``/healthz`` (so "listening on" is printed when it is true)."""
    import httpx

    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{f'[{local}]' if ':' in local else local}:{port}/healthz"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if api.poll() is not None:
            raise CliError(f"the API stopped before it listened on {host}:{port}; see its log above")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise CliError(f"the API did not answer on {host}:{port} within {timeout_s:.0f} s; see its log above")


def _secret_banner(settings) -> str:
    """Where the secret that signs download links lives (generated now on a first start)."""
    from core.signing import secret_path, signing_secret

    if settings.secret_key:
        return "download links are signed with LIKENESS_SECRET_KEY"
    signing_secret(settings)
    return (f"download links are signed with this install's secret: {secret_path(settings)} "
            "(mode 600; keep it private; set LIKENESS_SECRET_KEY to use your own)")


def _start_bot(settings, url: str) -> subprocess.Popen:
    """``likeness bot`` as a child, talking to this API with a bot client's key (created once, kept in data_dir)."""
    key = os.environ.get("LIKENESS_API_KEY")
    if not key:
        path = settings.data_dir / "bot_api_key"
        if not path.exists():
            path.write_text(_create_client("telegram-bot", "bot") + "\n")
            path.chmod(0o600)
        key = path.read_text().strip()
    local = url.replace("://0.0.0.0:", "://127.0.0.1:")
    env = {**os.environ, "LIKENESS_API_URL": os.environ.get("LIKENESS_API_URL") or local, "LIKENESS_API_KEY": key}
    console.print("Telegram bot: started (LIKENESS_TELEGRAM_TOKEN is set)")
    return subprocess.Popen([sys.executable, "-m", "likeness", "bot"], env=env)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(children: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)  # celery: warm shutdown; uvicorn: graceful
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    _reap_process_group()


def _reap_process_group(timeout_s: float = 10.0) -> None:
    """What the children left in this process group (a Celery pool process whose parent was killed): given
    ``timeout_s`` to exit, then killed, so that Ctrl-C or SIGTERM leaves no process behind."""
    group, me = os.getpgid(0), os.getpid()
    if group != me:  # not a group of our own (a pipeline, a supervisor's group): its other members are not ours
        return

    def members() -> list[int]:
        found = []
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
            if entry.isdigit() and int(entry) != me:
                try:
                    if os.getpgid(int(entry)) == group:
                        found.append(int(entry))
                except (ProcessLookupError, PermissionError):
                    continue
        return found

    deadline = time.monotonic() + timeout_s
    while members() and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in members():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- models ------------------------------------------------------------------------------------------------


@models_app.command("pull")
def models_pull(
    preset: Annotated[str | None, typer.Option(
        help="tiny | sd15 | tiny-sdxl | sdxl (default: LIKENESS_MODEL_PRESET; auto: sd15).")] = None,
) -> None:
    """Fetch every weight the preset needs into the local cache (tiny: build them)."""
    settings = _settings()
    name = preset or settings.model_preset
    pull("sd15" if name == "auto" else name, settings.resolved_model_cache_dir, console)


@models_app.command("check")
def models_check(
    preset: Annotated[str | None, typer.Option(
        help="tiny | sd15 | tiny-sdxl | sdxl (default: LIKENESS_MODEL_PRESET).")] = None,
) -> None:
    """Report what the preset still needs locally; exit 1 if anything is missing."""
    settings = _settings()
    name = preset or settings.preset
    missing = check(name, settings.resolved_model_cache_dir)
    if missing:
        for item in missing:
            console.print(f"[red]missing[/] {item}")
        console.print(f"run: likeness models pull --preset {name}")
        raise typer.Exit(1)
    console.print(f"preset {name}: every weight is available locally")


# ---- adapters ------------------------------------------------------------------------------------------------


class ExportFormat(str, Enum):
    kohya = "kohya"


@adapters_app.command("export")
def adapters_export(
    adapter_dir: Annotated[Path, typer.Argument(help="An adapter folder (manifest.json inside), e.g. from "
                                                     "`likeness run` (OUT/.work/training/adapter) or a downloaded "
                                                     "zip of GET /v1/subjects/{id}/adapter, unpacked.")],
    out: Annotated[Path, typer.Option("--out", help="The folder to write into (a path ending in .zip: one zip).")],
    format: Annotated[ExportFormat, typer.Option("--format", help="kohya: for A1111/ComfyUI (the LoRA, one "  # noqa: A002
                                                                  "embedding per token, HOW-TO-PROMPT.txt).")]
    = ExportFormat.kohya,
    name: Annotated[str, typer.Option(help="What A1111/ComfyUI will call the LoRA; the embeddings are "
                                           "NAME-<token>.")] = "likeness",
) -> None:
    """Convert a LoRA adapter for A1111/ComfyUI: the LoRA, the learned tokens' embeddings and how to prompt."""
    from pipelines.adapters import export_kohya, kohya_zip

    if out.suffix == ".zip":
        written = kohya_zip(adapter_dir, out, name)
        console.print(f"{format.value} export written to {written}:")
        _print_export_files(written)
        return
    export = export_kohya(adapter_dir, out, name)
    console.print(f"{format.value} export written to {out}:")
    for path in export.files:
        relative = path.relative_to(out).as_posix()
        console.print(f"  {relative}  {_export_file_role(relative)}")


def _export_file_role(name: str) -> str:
    from pipelines.adapters import KOHYA_EMBEDDINGS_DIR, KOHYA_README_NAME

    if name == KOHYA_README_NAME:
        return "how to prompt with these files"
    if name.startswith(f"{KOHYA_EMBEDDINGS_DIR}/"):
        return "a learned token's embedding (embeddings/)"
    return "the LoRA (models/Lora)"


def _print_export_files(path: Path) -> None:
    """What a kohya zip holds, one line per file (nothing for a single file)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            console.print(f"  {name}  {_export_file_role(name)}")


# ---- remote commands (a running service, through likeness.client) ----------------------------------------------

ApiUrl = Annotated[str | None, typer.Option("--api", help="The service's URL (default: LIKENESS_API_URL).")]
ApiKey = Annotated[str | None, typer.Option("--key", help="An API key (default: LIKENESS_API_KEY).")]


def _remote(api: str | None, key: str | None):
    from likeness.client import Client

    return Client(api, key)


@jobs_app.command("wait")
def jobs_wait(
    job_id: str,
    api: ApiUrl = None,
    key: ApiKey = None,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
) -> None:
    """Follow a job with a progress bar until it ends; exit 1 unless it succeeded."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from likeness.client.errors import LikenessError

    with _remote(api, key) as client:
        try:  # the first answer before any progress bar: an unreachable API fails now, in one line
            first = client.get_job(job_id)
        except LikenessError as exc:
            if exc.transient:
                raise CliError(f"{exc} Is the service running? (--api or LIKENESS_API_URL)") from None
            raise
        with Progress(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                      TextColumn("{task.fields[eta]}"), TimeElapsedColumn(), console=console) as bars:
            job = _follow(client, first, bars, timeout)
    if not job.succeeded:
        raise CliError(f"job {job.id} {job.state.value}: {job.error_message or ''} ({job.error_code})")
    console.print(f"job {job.id} ({job.kind.value}) succeeded")


def _follow(client, first, bars, timeout: float | None):  # noqa: ANN001, ANN202 - a Client, a Job, a Progress
    """Update one progress bar from the job's polls until it ends; returns the final job."""
    task = bars.add_task(first.stage or first.state.value, total=100, completed=first.progress, eta="")
    job = first
    if not first.done:
        for job in client.wait(first.id, timeout_s=timeout):  # noqa: B007 - the last one is the answer
            eta = f"ETA {job.eta_s:.0f} s" if job.eta_s else ""
            bars.update(task, completed=job.progress, description=job.stage or job.state.value, eta=eta)
    bars.update(task, completed=job.progress)
    return job


class AdapterFormat(str, Enum):
    diffusers = "diffusers"
    kohya = "kohya"


@adapters_app.command("download")
def adapters_download(
    subject_id: str,
    out: Annotated[str, typer.Option("--out", help="A folder (an existing one, or a path ending in /: the server's "
                                                   "file name) or a file path.")] = ".",
    format: Annotated[AdapterFormat, typer.Option("--format", help="diffusers: zip of the adapter folder; "  # noqa: A002
                                                                     "kohya: zip for A1111/ComfyUI.")]
    = AdapterFormat.diffusers,
    version: Annotated[int | None, typer.Option(help="Default: the newest adapter.")] = None,
    api: ApiUrl = None,
    key: ApiKey = None,
) -> None:
    """Download a subject's trained adapter from the service."""
    with _remote(api, key) as client:
        path = client.download_adapter(subject_id, out, format=format.value, version=version)  # str: keeps a "/"
    console.print(f"adapter written to {path} ({path.stat().st_size} bytes)")
    if format is AdapterFormat.kohya:
        _print_export_files(path)


# ---- Telegram bot ------------------------------------------------------------------------------------------------


@app.command()
def bot(
    webhook_url: Annotated[str | None, typer.Option("--webhook-url", help="Webhook mode: the public HTTPS URL "
                                                    "Telegram posts updates to (default: long polling).")] = None,
    listen: Annotated[str, typer.Option(help="Webhook mode: host:port the webhook server binds.")] = "0.0.0.0:8081",
) -> None:
    """Run the Telegram bot (LIKENESS_TELEGRAM_TOKEN, LIKENESS_API_URL, LIKENESS_API_KEY of a bot client)."""
    import asyncio
    import logging

    from pydantic import ValidationError

    try:
        from likeness.bot.config import BotSettings
        from likeness.bot.runner import run_polling, run_webhook
    except ImportError as exc:
        raise CliError(f"the bot needs its extra: pip install -e '.[bot]' ({exc})") from None
    try:
        settings = BotSettings()
    except ValidationError as exc:
        problems = [f"set LIKENESS_{str(e['loc'][0]).upper()}" if e["type"] == "missing" else
                    f"LIKENESS_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors()]
        raise CliError("; ".join(problems)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "aiogram.event"):  # one line per request / update otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if webhook_url:
        host, _, port = listen.rpartition(":")
        asyncio.run(run_webhook(settings, webhook_url, host or "0.0.0.0", int(port)))
    else:
        asyncio.run(run_polling(settings))


# ---- one-shot run --------------------------------------------------------------------------------------------


TEMPLATE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif")


def _template_config(template: str, n: int, k: int, seed: int, strength: float | None, second_pass: bool):
    """``--template NAME_OR_FILE`` as the request the API would get: a shipped name or an uploaded file."""
    from likeness.contract.requests import TemplateRequest
    from worker.local import LOCAL_TEMPLATE_ID

    options = {"n": n, "k": k, "seed": seed, "strength": strength, "second_pass": second_pass}
    path = Path(template).expanduser()
    if path.is_file():
        return TemplateRequest(template_photo_id=LOCAL_TEMPLATE_ID, **options), path
    if os.sep in template or path.suffix.lower() in TEMPLATE_FILE_SUFFIXES:
        raise CliError(f"no template file {template} (or give a shipped template's name)")
    return TemplateRequest(template=template, **options), None


@app.command()
def run(
    photos_dir: Annotated[Path, typer.Argument(help="Folder of 5-20 photos of one person.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for images and report.json.")],
    style: Annotated[str | None, typer.Option(help="Style pack name (see pipelines/styles).")] = None,
    template: Annotated[str | None, typer.Option(
        help="Template mode instead of a style: a shipped template's name (pipelines/templates/library) or a "
             "photo file of one person to put the subject into.")] = None,
    preset: Annotated[str | None, typer.Option(
        help="tiny | tiny-sdxl (random weights: images are noise) | sd15 | sdxl | auto: sd15 when its weights are "
             "here (default: LIKENESS_MODEL_PRESET)")] = None,
    n: Annotated[int, typer.Option(help="Candidates generated.")] = 8,
    k: Annotated[int, typer.Option(help="Best candidates kept (and upscaled).")] = 4,
    seed: int = 0,
    device: str = "auto",
    train_steps: Annotated[int | None, typer.Option(help="Override total training steps (quick demos).")] = None,
    no_checkpoint_selection: Annotated[bool, typer.Option(
        "--no-checkpoint-selection", help="Keep the finished adapter instead of the training snapshot that "
                                          "looks most like the person (saves the selecting stage).")] = False,
    strength: Annotated[float | None, typer.Option(help="Template mode: denoising strength (default 0.45).")] = None,
    second_pass: Annotated[bool, typer.Option("--second-pass", help="Template mode: redraw the face alone at "
                                                                    "higher resolution.")] = False,
) -> None:
    """Photos folder -> portraits folder, locally, through the same pipeline as the service."""
    from core import logs

    logs.quiet_libraries()  # before the ML libraries load: no weight-loading bars or TF Lite chatter
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from likeness.contract.requests import GenerateRequest, TrainRequest
    from pipelines.templates.masking import TemplateRejected
    from worker.local import LocalRunConfig, run_local

    if (style is None) == (template is None):
        raise CliError("give --style STYLE or --template NAME_OR_FILE (one of them)")
    settings = _settings()
    asked = preset or settings.model_preset
    preset = _checked_preset(asked, settings)  # before any photo is read or model loaded
    console.print(_preset_banner(asked, preset), highlight=False)
    train = TrainRequest(steps=train_steps, select_checkpoint=False if no_checkpoint_selection else None)
    config = LocalRunConfig(train=train, preset=preset, device=device)
    if style is not None:
        config = dataclasses.replace(config, generate=GenerateRequest(style=style, n=n, k=k, seed=seed))
    else:
        request, file = _template_config(template, n, k, seed, strength, second_pass)
        config = dataclasses.replace(config, template=request, template_file=file)
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bars:
        tasks: dict[str, int] = {}

        def on_progress(event) -> None:
            if event.stage not in tasks:
                for _stage, task_id in tasks.items():  # earlier stages are finished
                    bars.update(task_id, completed=100)
                tasks[event.stage] = bars.add_task(event.stage, total=100)
            bars.update(tasks[event.stage], completed=100 * event.fraction)

        try:
            report = run_local(photos_dir, out, config, settings.resolved_model_cache_dir,
                               on_progress=on_progress, on_verdicts=lambda rows: console.print(_verdict_table(rows)))
        except DatasetRejected as exc:
            raise CliError(f"{exc.message} Nothing was trained. Each photo's verdict and what to do about it: "
                           f"{out / 'report.json'}") from None
        except TemplateRejected as exc:
            raise CliError(f"{exc.message} ({exc.error_code}) Nothing was trained; see {out / 'report.json'}") from None
        for task_id in tasks.values():
            bars.update(task_id, completed=100)
    accepted = sum(1 for p in report["photos"] if p["accepted"])
    console.print(f"{accepted}/{len(report['photos'])} photos used, class token [bold]{report['class_token']}[/]; "
                  f"{_count(len(report['candidates']), 'image')} and report.json in {out}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _verdict_table(rows: list[dict]):
    """Intake's verdict per photo, printed before training starts (and for a rejected set)."""
    from rich.table import Table

    used = sum(1 for row in rows if row.get("used", row["accepted"]))
    table = Table(title=f"photos: {used} of {len(rows)} used", title_justify="left", show_edge=False)
    for column in ("photo", "verdict", "reason", "what to do"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if row["accepted"] and not row.get("used", True):  # fine, but too few fine ones: nothing was trained
            table.add_row(row["file"] or row["photo_id"], "[yellow]usable[/]", "", "")
        elif row["accepted"]:
            table.add_row(row["file"] or row["photo_id"], "[green]used[/]", "", "")
        else:
            table.add_row(row["file"] or row["photo_id"], "[red]not used[/]", row["reason_code"], row["what_to_do"])
    return table


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # one line for humans, the trace only with --debug
        if _state["debug"] or "--debug" in sys.argv:
            raise
        from rich.markup import escape

        err.print(f"[red]error:[/] {escape(_describe(exc))}", soft_wrap=True, highlight=False)
        sys.exit(1)


def _describe(exc: Exception) -> str:
    if isinstance(exc, PipelineError):
        return f"{exc.message} ({exc.error_code})"
    if isinstance(exc, CliError):
        return str(exc)
    from likeness.client.errors import LikenessError

    if isinstance(exc, LikenessError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    main()
