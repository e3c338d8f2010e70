"""The public API's per-model lock (``adapterspec.model_lock``): one per model object, gone with the model."""

from __future__ import annotations

import gc
import threading

import adapterspec
from adapterspec import api


class _Model:
    pass


class _EqualToAll:
    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0


def test_one_lock_per_model_object() -> None:
    a, b = _Model(), _Model()
    assert adapterspec.model_lock(a) is adapterspec.model_lock(a)
    assert adapterspec.model_lock(a) is not adapterspec.model_lock(b)
    x, y = _EqualToAll(), _EqualToAll()  # equal objects are still two models
    assert adapterspec.model_lock(x) is not adapterspec.model_lock(y)


def test_the_lock_goes_with_its_model() -> None:
    model = _Model()
    adapterspec.model_lock(model)
    key = id(model)
    assert key in api._LOCKS
    del model
    gc.collect()
    assert key not in api._LOCKS


def test_an_object_without_weak_references_gets_the_shared_lock() -> None:
    assert adapterspec.model_lock(3) is adapterspec.model_lock("model") is api._SHARED_LOCK


def test_the_lock_is_reentrant_and_blocks_other_threads() -> None:
    model = _Model()
    lock = adapterspec.model_lock(model)
    acquired = []
    with lock, lock:
        thread = threading.Thread(target=lambda: acquired.append(lock.acquire(timeout=0.05)))
        thread.start()
        thread.join(timeout=5)
    assert acquired == [False] and not thread.is_alive()
