"""The worker's models: loaded once per process, shared by every stage, borrowed per job.

One :class:`ModelManager` per worker process (cog's setup/predict, InvokeAI's model cache).
Pipelines describe what they need as specs (:mod:`pipelines.models.specs`); the manager
loads each spec's key once, keeps it within a memory budget and lends it to one job at a
time::

    manager = get_manager()
    with manager.borrow(intake_models(config)) as models:        # IntakeModels
        dataset = prepare_dataset(photos, config, models)

Keys are ``(what, source, device, dtype)``. A bundle borrows each of its parts under its
own key, so the CLIP that picks the class word at intake is the very object that ranks
candidates; the base pipeline that generation borrows is the one training borrows.

* **Locking**: a borrowed entry is locked for the borrowing job (a re-entrant lock: the
  same thread may borrow it again inside its own borrow); a second job waits. A bundle
  locks its parts in key order, so two jobs never deadlock.
* **Budget**: ``budget_bytes`` (None: unlimited). Before loading a key whose size is known
  (seen before) and after every load, the least recently used entries that nobody borrows
  are evicted until the total fits. A borrowed entry is never evicted; if everything is
  borrowed the manager runs over budget and says so (``over_budget`` in the snapshot).
* **States**: ``starting`` until the first load or :meth:`ModelManager.mark_ready`;
  ``loading`` while any load runs; ``busy`` while any entry is borrowed; ``idle`` otherwise.
  Listeners (:meth:`ModelManager.subscribe`) hear every change; :meth:`ModelManager.snapshot`
  is plain data for a heartbeat, :func:`prometheus_families` turns snapshots into metrics.

Free of Celery, database and torch imports (torch is touched only if already loaded), so it
is unit-testable with fake loaders.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipelines.models.specs import BundleSpec, ModelKey, ModelSpec

log = logging.getLogger(__name__)


class WorkerState(StrEnum):
    STARTING = "starting"  # the process is up, nothing loaded yet
    LOADING = "loading"  # a model is being loaded
    IDLE = "idle"  # ready; nothing borrowed
    BUSY = "busy"  # a job holds at least one model


StateListener = Callable[[WorkerState, WorkerState], None]


# ---------------------------------------------------------------------------- sizes


def estimate_nbytes(value: Any) -> int:
    """Bytes of the tensors (and numpy arrays) reachable from ``value``, each storage once.

    Walks torch modules (parameters and buffers), tensors, diffusers pipelines
    (``components``), dataclasses, mappings, sequences and plain objects' attributes a few
    levels deep. Objects with an integer ``nbytes`` attribute count that. MediaPipe graphs
    and dlib models hold their weights outside Python and count 0.
    """
    torch = sys.modules.get("torch")
    seen_storages: set[tuple[str, int]] = set()
    seen_objects: set[int] = set()
    total = 0

    def add_tensor(tensor) -> None:
        nonlocal total
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen_storages:
            seen_storages.add(key)
            total += storage.nbytes()

    def walk(obj: Any, depth: int) -> None:
        nonlocal total
        if obj is None or isinstance(obj, (str, bytes, int, float, bool)) or id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if torch is not None:
            if isinstance(obj, torch.Tensor):
                add_tensor(obj)
                return
            if isinstance(obj, torch.nn.Module):
                for tensor in (*obj.parameters(), *obj.buffers()):
                    add_tensor(tensor)
                return
        nbytes = getattr(obj, "nbytes", None)
        if isinstance(nbytes, int) and not isinstance(obj, type):
            total += nbytes
            return
        if depth <= 0:
            return
        components = getattr(obj, "components", None)
        if isinstance(components, Mapping):
            children: Iterable[Any] = components.values()
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            children = (getattr(obj, f.name) for f in dataclasses.fields(obj))
        elif isinstance(obj, Mapping):
            children = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = obj
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            children = vars(obj).values()
        else:
            return
        for child in children:
            walk(child, depth - 1)

    walk(value, 4)
    return total


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: float | str | None) -> int | None:
    """``"12GiB"``, ``"800 MB"``, ``12e9`` -> bytes; None, ``""``, ``"none"`` -> None (no budget)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    text = value.strip().lower().replace("_", "")
    if text in ("", "none", "unlimited"):
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", text)
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a size in bytes: {value!r} (e.g. 12GiB, 800MB, 1e9)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def resolve_budget(value: float | str | None, device: str) -> int | None:
    """A budget setting -> bytes. ``"auto"``: 90 % of the GPU's memory on CUDA, half the RAM elsewhere."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.9)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    return parse_bytes(value)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def release_memory(devices: Iterable[str]) -> None:
    """After an eviction: collect garbage, and give cached CUDA blocks back to the driver."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and any(d.startswith("cuda") for d in devices) and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- the manager


@dataclass(eq=False)
class _Entry:
    key: ModelKey
    value: Any
    nbytes: int
    load_s: float
    loaded_at: float  # wall clock (time.time)
    last_used: float  # manager clock
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    pins: int = 0  # jobs holding or waiting for this entry: it cannot be evicted
    holders: int = 0  # borrows currently inside the ``with``
    borrows: int = 0  # completed and current borrows, for the snapshot


class ModelManager:
    """Load once, lend to one job at a time, evict the least recently used idle model."""

    def __init__(
        self,
        budget_bytes: int | None = None,
        *,
        sizer: Callable[[Any], int] = estimate_nbytes,
        release: Callable[[Iterable[str]], None] = release_memory,
        clock: Callable[[], float] = time.monotonic,
        name: str | None = None,
    ):
        self.budget_bytes = budget_bytes
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"
        self._sizer = sizer
        self._release = release
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._entries: dict[ModelKey, _Entry] = {}
        self._loading: set[ModelKey] = set()
        self._known_sizes: dict[ModelKey, int] = {}
        self._ready = False
        self._state = WorkerState.STARTING
        self._state_since = time.time()
        self._listeners: list[StateListener] = []
        self._counters = {"loads": 0, "hits": 0, "evictions": 0, "load_failures": 0}
        self._load_seconds = 0.0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ states

    @property
    def state(self) -> WorkerState:
        return self._state

    def subscribe(self, listener: StateListener) -> None:
        """``listener(old, new)`` on every state change, called outside the manager's lock."""
        self._listeners.append(listener)

    def mark_ready(self) -> None:
        """Leave ``starting`` without loading anything (a worker that loads on demand)."""
        with self._cond:
            self._ready = True
            change = self._update_state()
        self._notify(change)

    def _update_state(self) -> tuple[WorkerState, WorkerState] | None:
        """Recompute the state (caller holds the lock); the change to announce, if any."""
        if self._loading:
            new = WorkerState.LOADING
        elif any(entry.holders for entry in self._entries.values()):
            new = WorkerState.BUSY
        elif self._ready:
            new = WorkerState.IDLE
        else:
            new = WorkerState.STARTING
        if new is self._state:
            return None
        old, self._state, self._state_since = self._state, new, time.time()
        return old, new

    def _notify(self, change: tuple[WorkerState, WorkerState] | None) -> None:
        if change is None:
            return
        log.info("worker models: %s -> %s", change[0].value, change[1].value)
        for listener in list(self._listeners):
            try:
                listener(*change)
            except Exception:  # a broken listener must not break a job
                log.warning("model manager state listener failed", exc_info=True)

    # ------------------------------------------------------------------ borrowing

    @contextmanager
    def borrow(self, spec: ModelSpec | BundleSpec, *, timeout_s: float | None = None) -> Iterator[Any]:
        """Yield the model (or assembled bundle) for ``spec``, loading what is missing; locked for this job.

        Raises ``TimeoutError`` when another job holds a part longer than ``timeout_s``.
        """
        specs = spec.specs()  # unique keys, sorted: every borrower locks in the same order
        with ExitStack() as stack:
            values = {s.key: stack.enter_context(self._borrow_one(s, timeout_s)) for s in specs}
            yield spec.assemble(lambda s: values[s.key])

    def preload(self, spec: ModelSpec | BundleSpec) -> None:
        """Load what ``spec`` names now (a worker's setup: ``starting -> loading -> idle``), unborrowed."""
        for part in spec.specs():
            entry = self._pin_or_load(part)
            with self._cond:
                entry.pins -= 1

    @contextmanager
    def _borrow_one(self, spec: ModelSpec, timeout_s: float | None) -> Iterator[Any]:
        entry = self._pin_or_load(spec)
        try:
            if not entry.lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
                raise TimeoutError(f"{entry.key} stayed borrowed by another job for {timeout_s} s")
        except BaseException:
            with self._cond:
                entry.pins -= 1
            raise
        try:
            with self._cond:
                entry.holders += 1
                entry.borrows += 1
                entry.last_used = self._clock()
                change = self._update_state()
            self._notify(change)
            yield entry.value
        finally:
            with self._cond:
                entry.holders -= 1
                entry.pins -= 1
                entry.last_used = self._clock()
                change = self._update_state()
                self._cond.notify_all()
            entry.lock.release()
            self._notify(change)

    def _pin_or_load(self, spec: ModelSpec) -> _Entry:
        """The entry for ``spec`` pinned (not evictable) for the caller, loaded if needed."""
        key = spec.key
        with self._cond:
            while True:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.pins += 1
                    self._counters["hits"] += 1
                    return entry
                if key not in self._loading:
                    break
                self._cond.wait()  # another thread is loading this key: take its result
            self._loading.add(key)
            evicted = self._evict_for(self._known_sizes.get(key, 0))
            change = self._update_state()
        self._after_eviction(evicted)
        self._notify(change)

        log.info("loading %s", key)
        started = self._clock()
        try:
            value = spec.load()
            nbytes = int(self._sizer(value))
        except BaseException as exc:
            with self._cond:
                self._loading.discard(key)
                self._counters["load_failures"] += 1
                self.last_error = f"loading {key}: {type(exc).__name__}: {exc}"[:500]
                change = self._update_state()
                self._cond.notify_all()
            self._notify(change)
            raise
        load_s = self._clock() - started
        with self._cond:
            entry = _Entry(key, value, nbytes, load_s, time.time(), self._clock(), pins=1)
            self._entries[key] = entry
            self._loading.discard(key)
            self._known_sizes[key] = nbytes
            self._counters["loads"] += 1
            self._load_seconds += load_s
            self._ready = True
            evicted = self._evict_for(0)
            change = self._update_state()
            self._cond.notify_all()
        log.info("loaded %s: %.1f MB in %.1f s", key, nbytes / 1e6, load_s)
        self._after_eviction(evicted)
        self._notify(change)
        return entry

    # ------------------------------------------------------------------ budget

    def _evict_for(self, incoming: int) -> list[_Entry]:
        """Evict LRU unpinned entries until ``incoming`` more bytes fit (caller holds the lock)."""
        if self.budget_bytes is None:
            return []
        evicted = []
        while self._loaded_bytes() + incoming > self.budget_bytes:
            idle = [e for e in self._entries.values() if e.pins == 0]
            if not idle:
                log.warning("model budget %.0f MB exceeded (%.0f MB loaded, %.0f MB coming) and every model "
                            "is borrowed", self.budget_bytes / 1e6, self._loaded_bytes() / 1e6, incoming / 1e6)
                break
            victim = min(idle, key=lambda e: e.last_used)
            del self._entries[victim.key]
            self._counters["evictions"] += 1
            evicted.append(victim)
        return evicted

    def _after_eviction(self, evicted: list[_Entry]) -> None:
        """Close what was evicted, drop the references, give the memory back (outside the lock)."""
        if not evicted:
            return
        devices = {entry.key.device for entry in evicted}
        while evicted:
            _close(evicted.pop())
        self._release(devices)

    def evict(self, key: ModelKey | ModelSpec | None = None) -> int:
        """Evict ``key`` (or every entry) unless borrowed; returns how many were evicted."""
        key = key.key if isinstance(key, ModelSpec) else key
        with self._cond:
            victims = [e for k, e in self._entries.items() if (key is None or k == key) and e.pins == 0]
            for entry in victims:
                del self._entries[entry.key]
                self._counters["evictions"] += 1
        count = len(victims)
        self._after_eviction(victims)
        return count

    def _loaded_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    # ------------------------------------------------------------------ reporting

    def __contains__(self, key: ModelKey | ModelSpec) -> bool:
        key = key.key if isinstance(key, ModelSpec) else key
        with self._cond:
            return key in self._entries

    def get(self, key: ModelKey) -> Any:
        """The loaded object under ``key`` without borrowing it (for inspection and tests only)."""
        with self._cond:
            return self._entries[key].value

    def loaded(self) -> list[dict[str, Any]]:
        """What is loaded, most recently used first, as plain data."""
        now = self._clock()
        with self._cond:
            entries = sorted(self._entries.values(), key=lambda e: -e.last_used)
            return [
                {
                    "name": str(e.key),
                    "what": e.key.what,
                    "source": e.key.source,
                    "device": e.key.device,
                    "dtype": e.key.dtype,
                    "bytes": e.nbytes,
                    "borrowed": e.holders > 0,
                    "borrows": e.borrows,
                    "idle_s": round(max(now - e.last_used, 0.0), 3) if e.holders == 0 else 0.0,
                    "load_s": round(e.load_s, 3),
                    "loaded_at": e.loaded_at,
                }
                for e in entries
            ]

    def snapshot(self) -> dict[str, Any]:
        """State, budget and loaded models as JSON-able data: for a heartbeat and ``/metrics``."""
        models = self.loaded()
        with self._cond:
            loaded_bytes = self._loaded_bytes()
            return {
                "worker": self.name,
                "state": self._state.value,
                "state_since": self._state_since,
                "budget_bytes": self.budget_bytes,
                "loaded_bytes": loaded_bytes,
                "over_budget": self.budget_bytes is not None and loaded_bytes > self.budget_bytes,
                "loading": sorted(str(k) for k in self._loading),
                "models": models,
                **self._counters,
                "load_seconds": round(self._load_seconds, 3),
                "last_error": self.last_error,
            }

    def heartbeat(self) -> dict[str, Any]:
        """The compact part of :meth:`snapshot` for a frequent heartbeat: state and loaded names/bytes."""
        snap = self.snapshot()
        return {
            "worker": snap["worker"],
            "state": snap["state"],
            "state_since": snap["state_since"],
            "loaded_bytes": snap["loaded_bytes"],
            "budget_bytes": snap["budget_bytes"],
            "models": [{"name": m["name"], "bytes": m["bytes"], "borrowed": m["borrowed"]} for m in snap["models"]],
        }

    def collector(self):
        """A ``prometheus_client`` collector over this process's manager (register it on a registry)."""
        manager = self

        class _Collector:
            def collect(self):
                return prometheus_families([manager.snapshot()])

        return _Collector()


def _close(entry: _Entry) -> None:
    log.info("evicted %s (%.1f MB, idle)", entry.key, entry.nbytes / 1e6)
    close = getattr(entry.value, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            log.warning("closing %s failed", entry.key, exc_info=True)
    entry.value = None


# ---------------------------------------------------------------------------- metrics


def prometheus_families(snapshots: Iterable[Mapping[str, Any]]):
    """Metric families from manager snapshots (one per worker; e.g. read back from heartbeats).

    * ``likeness_worker_state{worker,state}``: 1 for the worker's current state, 0 for the others
    * ``likeness_worker_model_budget_bytes{worker}`` / ``likeness_worker_model_loaded_bytes{worker}``
    * ``likeness_worker_model_bytes{worker,what,source,device,dtype}`` and ``..._model_borrowed{...}``
    * ``likeness_worker_model_loads_total``, ``..._evictions_total``, ``..._hits_total``,
      ``..._load_failures_total`` ``{worker}``
    """
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    state = GaugeMetricFamily("likeness_worker_state", "Worker model state (1 = current).", labels=["worker", "state"])
    budget = GaugeMetricFamily("likeness_worker_model_budget_bytes", "Model memory budget (absent: none).",
                               labels=["worker"])
    loaded = GaugeMetricFamily("likeness_worker_model_loaded_bytes", "Bytes of all loaded models.", labels=["worker"])
    labels = ["worker", "what", "source", "device", "dtype"]
    model_bytes = GaugeMetricFamily("likeness_worker_model_bytes", "Bytes of one loaded model.", labels=labels)
    borrowed = GaugeMetricFamily("likeness_worker_model_borrowed", "1 while a job holds the model.", labels=labels)
    counters = {
        name: CounterMetricFamily(f"likeness_worker_model_{name}", help_, labels=["worker"])
        for name, help_ in (("loads", "Models loaded."), ("evictions", "Models evicted."),
                            ("hits", "Borrows served without loading."), ("load_failures", "Loads that failed."))
    }
    for snap in snapshots:
        worker = str(snap.get("worker", ""))
        for value in WorkerState:
            state.add_metric([worker, value.value], 1.0 if snap.get("state") == value.value else 0.0)
        if snap.get("budget_bytes") is not None:
            budget.add_metric([worker], float(snap["budget_bytes"]))
        loaded.add_metric([worker], float(snap.get("loaded_bytes", 0)))
        for model in snap.get("models", ()):
            values = [worker, model["what"], model["source"], model["device"], model["dtype"]]
            model_bytes.add_metric(values, float(model["bytes"]))
            borrowed.add_metric(values, 1.0 if model["borrowed"] else 0.0)
        for name, family in counters.items():
            family.add_metric([worker], float(snap.get(name, 0)))
    return [state, budget, loaded, model_bytes, borrowed, *counters.values()]


# ---------------------------------------------------------------------------- one per process

_manager: ModelManager | None = None
_manager_pid = -1
_manager_lock = threading.Lock()


def get_manager(budget_bytes: int | None = None, name: str | None = None) -> ModelManager:
    """This process's manager, created on first call (in a Celery pool process: after the fork).

    ``budget_bytes`` and ``name`` (default ``host:pid``) apply when the manager is created;
    later calls return it unchanged.
    """
    with _manager_lock:
        if _manager is None or _manager_pid != os.getpid():
            _set_manager(ModelManager(budget_bytes, name=name))
        return _manager


def _set_manager(manager: ModelManager | None) -> None:
    global _manager, _manager_pid
    _manager, _manager_pid = manager, os.getpid()


def reset_manager() -> None:
    """Forget this process's manager (tests; a worker shutting down)."""
    with _manager_lock:
        _set_manager(None)


__all__ = [
    "ModelKey",
    "ModelManager",
    "WorkerState",
    "estimate_nbytes",
    "get_manager",
    "parse_bytes",
    "prometheus_families",
    "reset_manager",
    "resolve_budget",
    "resolve_device",
]
