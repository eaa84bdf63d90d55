"""The worker's model manager: load once, share, lock per job, evict within a budget, report states."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipelines.models.specs import BundleSpec, ModelKey, ModelSpec
from worker.models import (
    ModelManager,
    WorkerState,
    estimate_nbytes,
    get_manager,
    parse_bytes,
    prometheus_families,
    reset_manager,
)


class Blob:
    """A stand-in model of a known size."""

    def __init__(self, name: str, nbytes: int = 100):
        self.name = name
        self.nbytes = nbytes
        self.closed = False

    def close(self) -> None:
        self.closed = True


class CountingLoader:
    def __init__(self, name: str, nbytes: int = 100, delay_s: float = 0.0, fail: bool = False):
        self.name, self.nbytes, self.delay_s, self.fail = name, nbytes, delay_s, fail
        self.calls = 0

    def __call__(self) -> Blob:
        self.calls += 1
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError(f"cannot load {self.name}")
        return Blob(self.name, self.nbytes)


def spec(what: str, loader, source: str = "w", device: str = "cpu", dtype: str = "float32") -> ModelSpec:
    return ModelSpec(ModelKey(what, source, device, dtype), loader)


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# ---------------------------------------------------------------------------- loading and keys


def test_same_key_loads_once_and_returns_the_same_object():
    manager = ModelManager()
    loader = CountingLoader("clip")
    with manager.borrow(spec("clip", loader)) as first:
        pass
    with manager.borrow(spec("clip", CountingLoader("another loader, same key"))) as second:
        pass
    assert first is second and loader.calls == 1
    assert manager.snapshot()["loads"] == 1 and manager.snapshot()["hits"] == 1


def test_device_and_dtype_are_part_of_the_key():
    manager = ModelManager()
    loaders = {
        ("cpu", "float32"): CountingLoader("a"),
        ("cpu", "bfloat16"): CountingLoader("b"),
        ("cuda:0", "float32"): CountingLoader("c"),
    }
    got = {}
    for (device, dtype), loader in loaders.items():
        with manager.borrow(spec("base", loader, device=device, dtype=dtype)) as model:
            got[device, dtype] = model
    assert len({id(m) for m in got.values()}) == 3
    assert all(loader.calls == 1 for loader in loaders.values())
    assert {(m["device"], m["dtype"]) for m in manager.loaded()} == set(loaders)


def test_two_threads_asking_for_one_key_load_it_once():
    manager = ModelManager()
    loader = CountingLoader("slow", delay_s=0.2)
    results = []

    def borrow():
        with manager.borrow(spec("slow", loader)) as model:
            results.append(model)

    threads = [threading.Thread(target=borrow) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert loader.calls == 1 and len(results) == 3 and all(r is results[0] for r in results)


def test_a_failed_load_is_reported_and_retried_next_time():
    manager = ModelManager()
    failing = spec("clip", CountingLoader("clip", fail=True))
    with pytest.raises(RuntimeError), manager.borrow(failing):
        pass
    snap = manager.snapshot()
    assert snap["load_failures"] == 1 and "cannot load clip" in snap["last_error"]
    assert snap["state"] == "starting" and snap["models"] == []
    with manager.borrow(spec("clip", CountingLoader("clip"))) as model:
        assert model.name == "clip"


# ---------------------------------------------------------------------------- budget


def test_budget_evicts_the_least_recently_used_idle_entry():
    released = []
    clock = iter(range(1000)).__next__
    manager = ModelManager(budget_bytes=250, clock=lambda: float(clock()), release=released.append)
    a, b, c = (spec(name, CountingLoader(name, 100)) for name in "abc")
    manager.preload(a)
    manager.preload(b)
    with manager.borrow(a):  # a is now the most recently used
        pass
    with manager.borrow(c) as model_c:  # 300 > 250: b (least recently used) goes
        assert model_c.name == "c"
    assert a.key in manager and c.key in manager and b.key not in manager
    assert manager.snapshot()["evictions"] == 1 and manager.snapshot()["loaded_bytes"] == 200
    assert released == [{"cpu"}]  # memory given back for the device it lived on


def test_a_borrowed_entry_is_never_evicted():
    manager = ModelManager(budget_bytes=150)
    big, other = spec("base", CountingLoader("base", 100)), spec("clip", CountingLoader("clip", 100))
    with manager.borrow(big) as base:
        with manager.borrow(other) as clip:  # over budget, but both are borrowed: nothing can go
            assert big.key in manager and other.key in manager
            assert manager.snapshot()["over_budget"] is True
        assert not clip.closed
    # Once free, the next load evicts the least recently used: CLIP, released before the base.
    with manager.borrow(spec("vae", CountingLoader("vae", 40))):
        pass
    assert other.key not in manager and big.key in manager and clip.closed and not base.closed


def test_a_known_size_makes_room_before_loading():
    """A key loaded before (then evicted) frees memory *before* it loads again, not after."""
    seen_while_loading = []
    manager = ModelManager(budget_bytes=150)

    def load_a():
        seen_while_loading.append({m["what"] for m in manager.loaded()})
        return Blob("a", 100)

    a, b = spec("a", load_a), spec("b", CountingLoader("b", 100))
    manager.preload(a)
    manager.preload(b)  # evicts a after loading (size unknown until then)
    manager.preload(a)  # a's size is known: b is evicted before a loads
    assert seen_while_loading == [set(), set()]


def test_evict_leaves_borrowed_entries():
    manager = ModelManager()
    a, b = spec("a", CountingLoader("a")), spec("b", CountingLoader("b"))
    manager.preload(a)
    with manager.borrow(b):
        assert manager.evict() == 1
        assert b.key in manager and a.key not in manager


# ---------------------------------------------------------------------------- locking


class _WatchedLock:
    """The entry's lock, telling when a borrower found it taken and started to wait."""

    def __init__(self, lock):  # noqa: ANN001
        self._lock, self.refused = lock, threading.Event()

    def acquire(self, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        self.refused.set()
        return self._lock.acquire(timeout=timeout)

    def release(self) -> None:
        self._lock.release()


def test_a_borrowed_entry_is_locked_and_a_second_borrower_waits():
    manager = ModelManager()
    base = spec("base", CountingLoader("base"))
    manager.preload(base)
    watched = _WatchedLock(manager._entries[base.key].lock)
    manager._entries[base.key].lock = watched
    order = []

    def second_job():
        with manager.borrow(base):
            order.append("second has it")

    with manager.borrow(base):
        worker = threading.Thread(target=second_job)
        worker.start()
        assert watched.refused.wait(5), "the second borrower never met the lock"
        assert order == []  # refused, and waiting
        order.append("first releases")
    worker.join(5)
    assert order == ["first releases", "second has it"]


def test_a_borrower_can_time_out():
    manager = ModelManager()
    base = spec("base", CountingLoader("base"))
    holding, done = threading.Event(), threading.Event()

    def holder():
        with manager.borrow(base):
            holding.set()
            done.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(5)
    with pytest.raises(TimeoutError), manager.borrow(base, timeout_s=0.05):
        pass
    done.set()
    thread.join(5)
    with manager.borrow(base, timeout_s=1):  # the timed-out borrower left nothing pinned or locked
        pass


def test_the_same_job_may_borrow_an_entry_it_holds():
    manager = ModelManager()
    clip = spec("clip", CountingLoader("clip"))
    with manager.borrow(clip) as outer, manager.borrow(clip) as inner:
        assert outer is inner


def test_bundles_lock_their_parts_in_one_order_so_jobs_never_deadlock():
    manager = ModelManager()
    a, b = spec("a", CountingLoader("a")), spec("b", CountingLoader("b"))
    ab = BundleSpec({"first": a, "second": b}, dict)
    ba = BundleSpec({"first": b, "second": a}, dict)
    errors = []

    def job(bundle):
        try:
            for _ in range(50):
                with manager.borrow(bundle) as parts:
                    assert set(parts) == {"first", "second"}
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(bundle,)) for bundle in (ab, ba, ab, ba)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads) and errors == []


def test_a_bundle_shares_parts_with_other_bundles():
    manager = ModelManager()
    clip = spec("clip", CountingLoader("clip"))
    intake = BundleSpec({"clip": clip, "segmenter": spec("segmenter", CountingLoader("seg"))}, dict)
    ranking = BundleSpec({"clip": clip, "aesthetic": spec("aesthetic", CountingLoader("head"))}, dict)
    with manager.borrow(intake) as i, manager.borrow(ranking) as r:
        assert i["clip"] is r["clip"]
    assert len(manager.loaded()) == 3


# ---------------------------------------------------------------------------- states and reporting


def test_states_move_starting_loading_idle_busy_idle():
    manager = ModelManager()
    changes = []
    manager.subscribe(lambda old, new: changes.append(new.value))
    seen_while_loading = []
    base = spec("base", lambda: seen_while_loading.append(manager.state) or Blob("base"))
    assert manager.state is WorkerState.STARTING
    manager.preload(base)  # the worker's setup
    assert seen_while_loading == [WorkerState.LOADING] and manager.state is WorkerState.IDLE
    with manager.borrow(base):
        assert manager.state is WorkerState.BUSY
    assert manager.state is WorkerState.IDLE
    assert changes == ["loading", "idle", "busy", "idle"]


def test_a_lazy_worker_is_ready_without_loading():
    manager = ModelManager()
    manager.mark_ready()
    assert manager.state is WorkerState.IDLE


def test_snapshot_heartbeat_and_metrics_are_plain_data():
    from prometheus_client import CollectorRegistry, generate_latest

    manager = ModelManager(budget_bytes=10_000, name="gpu-1")
    manager.preload(spec("clip", CountingLoader("clip", 300), source="openai/clip-vit-large-patch14"))
    with manager.borrow(spec("base", CountingLoader("base", 700), source="sd15")):
        snap = manager.snapshot()
        beat = manager.heartbeat()
        registry = CollectorRegistry()
        registry.register(manager.collector())
        text = generate_latest(registry).decode()
    json.dumps(snap), json.dumps(beat)
    assert snap["state"] == "busy" and snap["loaded_bytes"] == 1000 and snap["budget_bytes"] == 10_000
    assert [(m["what"], m["bytes"], m["borrowed"]) for m in snap["models"]] == [
        ("base", 700, True),
        ("clip", 300, False),
    ]
    assert beat == {
        "worker": "gpu-1",
        "state": "busy",
        "state_since": snap["state_since"],
        "loaded_bytes": 1000,
        "budget_bytes": 10_000,
        "models": [
            {"name": "base[sd15]@cpu/float32", "bytes": 700, "borrowed": True},
            {"name": "clip[openai/clip-vit-large-patch14]@cpu/float32", "bytes": 300, "borrowed": False},
        ],
    }
    assert 'likeness_worker_state{state="busy",worker="gpu-1"} 1.0' in text
    assert 'likeness_worker_state{state="idle",worker="gpu-1"} 0.0' in text
    assert 'likeness_worker_model_bytes{device="cpu",dtype="float32",source="sd15",what="base",worker="gpu-1"} 700.0' in text  # noqa: E501
    assert 'likeness_worker_model_loaded_bytes{worker="gpu-1"} 1000.0' in text
    assert 'likeness_worker_model_loads_total{worker="gpu-1"} 2.0' in text
    # The API side renders heartbeats it stored, without a manager.
    families = prometheus_families([json.loads(json.dumps(beat | {"models": snap["models"]}))])
    assert {f.name for f in families} >= {"likeness_worker_state", "likeness_worker_model_bytes"}


def test_one_manager_per_process():
    reset_manager()
    try:
        assert get_manager(123) is get_manager() and get_manager().budget_bytes == 123
    finally:
        reset_manager()


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("800 MB") == 800_000_000
    assert parse_bytes(1e9) == 10**9
    assert parse_bytes("none") is None and parse_bytes(None) is None
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_sizes_count_each_tensor_storage_once():
    import torch

    linear = torch.nn.Linear(10, 10)  # 110 float32 parameters
    assert estimate_nbytes(linear) == 440
    tied = torch.nn.ModuleList([linear, linear])
    assert estimate_nbytes({"a": tied, "b": [linear]}) == 440
    assert estimate_nbytes(Blob("x", 5)) == 5
    assert estimate_nbytes(object()) == 0
