"""Fixtures of the keras backend tests: tiny random transformers checkpoints and their keras-hub twins.

The TensorFlow backend is required (set before keras is imported); every test file also runs on
other Keras backends where the packages are there, with ``KERAS_BACKEND`` set by the caller.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

pytest.importorskip("keras")
pytest.importorskip("keras_hub")

from keras_helpers import ARCHS, build_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _deleted_variables_skip_the_full_collection() -> Iterator[None]:
    """Keras' ``Layer.__delattr__`` runs a full ``gc.collect()`` for each variable it deletes (``model.quantize``
    deletes every kernel it replaces). In the suite's process, which holds every imported framework and the garbage
    of earlier tests, each takes seconds: tests/keras/test_quantized.py took 500 s of a 42-minute run, one
    ``quantize`` of the tiny Llama 78 s. The tests skip that collection (its purpose: freeing device buffers a
    moment earlier); Python's own generational collection runs as before."""
    from keras.src.layers.layer import Layer

    original = Layer.__delattr__

    def __delattr__(self: Any, name: str) -> None:  # noqa: N807 -- the method it replaces
        collect, gc.collect = gc.collect, lambda generation=2: 0
        try:
            original(self, name)
        finally:
            gc.collect = collect

    Layer.__delattr__ = __delattr__  # type: ignore[method-assign]
    yield
    Layer.__delattr__ = original  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> folder holding a tiny random transformers checkpoint (config.json + model.safetensors), built lazily."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, Path] = {}

    class _Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, arch: str) -> Path:
            cache[arch] = build_checkpoint(arch, root / arch)
            self[arch] = cache[arch]
            return cache[arch]

    return _Lazy()


@pytest.fixture(scope="session")
def token_ids() -> Any:
    import numpy as np

    return (np.arange(2 * 9).reshape(2, 9) * 7 + 3) % ARCHS["llama"].vocab
