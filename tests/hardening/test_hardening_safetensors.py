"""Hostile safetensors files: every truncation, byte flips everywhere, crafted headers, generated headers.

Each file is read through the public API (``validate_adapter``, then ``read_adapter`` and
``Adapter.load_tensors("numpy")`` when it validates); every outcome must be a clean result or an
``AdapterSpecError`` naming the file -- never another exception, never a hang, never a change on disk.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hardening_harness import SCALE, STATS, Outcome, expect_clean, long_mode_extra, probe, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterspec
from adapterspec.spec import SAFETENSORS_NAME

pytestmark = pytest.mark.filterwarnings("ignore::adapterspec.AdapterSpecWarning")


def _exercise(folder: Path, label: str) -> list[Outcome]:
    """validate_adapter always; read_adapter and load_tensors when the folder validates."""
    weights = folder / SAFETENSORS_NAME
    outcome = probe(label + ":validate", lambda: adapterspec.validate_adapter(folder))
    outcomes = [outcome]
    if outcome.kind == "ok":
        problems = outcome.value
        for problem in problems:
            assert isinstance(problem, adapterspec.AdapterSpecError)
            assert problem.path or problem.key or problem.pointer is not None, f"{label}: {problem!r} names nothing"
        if not problems:
            read = probe(label + ":read", lambda: adapterspec.read_adapter(folder, verify=True))
            outcomes.append(read)
            if read.kind == "ok":
                outcomes.append(probe(label + ":load", lambda: read.value.load_tensors("numpy")))
    for o in outcomes:
        if o.kind == "typed":
            where = f"{o.error.path} {o.error.key} {o.error.pointer} {o.error}"
            assert weights.name in where or "adapter_config" in where or o.error.key, f"{label}: {o.error!r} names no file"
    return outcomes


def _mutated(folder: Path, blob: bytes, label: str) -> list[Outcome]:
    (folder / SAFETENSORS_NAME).write_bytes(blob)
    before = snapshot(folder)
    outcomes = _exercise(folder, label)
    if snapshot(folder) != before:
        STATS.mutations.append(label)
    return outcomes


def test_truncation_at_every_byte(lean_copy: Path) -> None:
    adapter_copy = lean_copy
    blob = (adapter_copy / SAFETENSORS_NAME).read_bytes()
    outcomes = []
    for cut in range(len(blob)):
        outcomes += _mutated(adapter_copy, blob[:cut], f"truncate@{cut}")
    STATS.count("safetensors-truncation", len(blob))
    expect_clean(outcomes)
    extra = long_mode_extra(blob, len(blob), seed=2)
    extra_outcomes = [o for i, m in enumerate(extra) for o in _mutated(adapter_copy, m, f"random mutation {i}")]
    STATS.count("safetensors-random-mutation", len(extra))
    expect_clean(extra_outcomes)
    validated = [o for o in outcomes if o.label.endswith(":validate")]
    assert all(o.kind == "typed" or (o.kind == "ok" and o.value) for o in validated), "a truncated file validated"


def test_byte_flips_everywhere(lean_copy: Path) -> None:
    adapter_copy = lean_copy
    blob = bytearray((adapter_copy / SAFETENSORS_NAME).read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    data_start = 8 + n
    outcomes, tampered = [], []
    flips = [lambda b: b ^ 0x01, lambda b: b ^ 0x80, lambda b: 0xFF, lambda b: b ^ 0x20]
    for at in range(len(blob)):
        for flip in flips:
            mutated = bytearray(blob)
            mutated[at] = flip(blob[at])
            if mutated == blob:
                continue
            result = _mutated(adapter_copy, bytes(mutated), f"flip@{at}={mutated[at]:#x}")
            outcomes += result
            STATS.count("safetensors-byte-flip")
            if at >= data_start:
                tampered.append(result[0])
    extra = long_mode_extra(bytes(blob), len(blob) * len(flips), seed=1)
    for i, mutated in enumerate(extra):
        outcomes += _mutated(adapter_copy, mutated, f"random mutation {i}")
    STATS.count("safetensors-random-mutation", len(extra))
    expect_clean(outcomes)
    # A changed data byte is invisible to the header, so only the checksum can catch it: it must.
    for o in tampered:
        assert o.kind == "ok", o.label
        checksum = [e for e in o.value if isinstance(e, adapterspec.IntegrityError) and "sha256" in str(e)]
        assert checksum and SAFETENSORS_NAME in str(checksum[0]), (o.label, o.value)


def _header_file(header: object, data: bytes = b"", *, length: int | None = None, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict:
    return {"dtype": dtype, "shape": shape if shape is not None else [2, 3], "data_offsets": offsets or [0, 24]}


_A = "base_model.model.l.0.q.lora_A.weight"
_B = "base_model.model.l.0.q.lora_B.weight"

CRAFTED = {
    "empty file": b"",
    "7 bytes": b"\x00" * 7,
    "header length 10**18": struct.pack("<Q", 10**18) + b"{}",
    "header length 2**64-1": struct.pack("<Q", 2**64 - 1) + b"{}",
    "header length past the end": _header_file({}, length=4096),
    "header length 0": _header_file(None, raw=b""),
    "header not JSON": _header_file(None, raw=b"{nope"),
    "header a list": _header_file([1, 2, 3]),
    "header a string": _header_file("x"),
    "header null": _header_file(None),
    "header non-UTF8": _header_file(None, raw=b'{"\xff\xfe":1}'),
    "header lone surrogate": _header_file(None, raw=b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', data=b"\0" * 4),
    "header NaN": _header_file(None, raw=b'{"a":NaN}'),
    "header deep nesting": _header_file(None, raw=b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "metadata value int": _header_file({"__metadata__": {"format": 1}}),
    "metadata value null": _header_file({"__metadata__": {"format": None}}),
    "metadata value object": _header_file({"__metadata__": {"format": {"a": "b"}}}),
    "metadata a list": _header_file({"__metadata__": ["a"]}),
    "metadata version 99.0": _header_file({"__metadata__": {"adapterspec_version": "99.0"}, _A: _entry()}, b"\0" * 24),
    "metadata version garbage": _header_file({"__metadata__": {"adapterspec_version": "one"}, _A: _entry()}, b"\0" * 24),
    "sha256 not hex": _header_file({"__metadata__": {"adapterspec_sha256": "zz"}, _A: _entry()}, b"\0" * 24),
    "offsets out of bounds": _header_file({_A: _entry(offsets=[0, 4000])}, b"\0" * 24),
    "offsets reversed": _header_file({_A: _entry(offsets=[24, 0])}, b"\0" * 24),
    "offsets 2**64": _header_file({_A: _entry(offsets=[0, 2**64])}, b"\0" * 24),
    "offsets negative": _header_file({_A: _entry(offsets=[-8, 16])}, b"\0" * 24),
    "offsets three": _header_file({_A: {**_entry(), "data_offsets": [0, 12, 24]}}, b"\0" * 24),
    "offsets strings": _header_file({_A: {**_entry(), "data_offsets": ["0", "24"]}}, b"\0" * 24),
    "overlapping tensors": _header_file({_A: _entry(), _B: _entry(shape=[4, 2], offsets=[0, 32])}, b"\0" * 32),
    "gap between tensors": _header_file({_A: _entry(), _B: _entry(shape=[1], offsets=[28, 32])}, b"\0" * 32),
    "trailing bytes": _header_file({_A: _entry()}, b"\0" * 40),
    "shape/offset disagree": _header_file({_A: _entry(shape=[5, 3])}, b"\0" * 24),
    "shape overflow": _header_file({_A: _entry(shape=[2**62, 2**62])}, b"\0" * 24),
    "shape negative": _header_file({_A: _entry(shape=[-2, 3])}, b"\0" * 24),
    "shape float": _header_file({_A: _entry(shape=[2.0, 3])}, b"\0" * 24),
    "shape 10**30 elements, offsets small": _header_file({_A: _entry(shape=[10**15, 10**15])}, b"\0" * 24),
    "dtype unknown": _header_file({_A: _entry(dtype="F33")}, b"\0" * 24),
    "dtype lower case": _header_file({_A: _entry(dtype="f32")}, b"\0" * 24),
    "dtype int": _header_file({_A: _entry(dtype=4)}, b"\0" * 24),
    "dtype I64 (not allowed)": _header_file({_A: _entry(dtype="I64", offsets=[0, 48])}, b"\0" * 48),
    "dtype F8 (not allowed)": _header_file({_A: _entry(dtype="F8_E4M3", offsets=[0, 6])}, b"\0" * 6),
    "dtype BOOL": _header_file({_A: _entry(dtype="BOOL", offsets=[0, 6])}, b"\0" * 6),
    "missing dtype": _header_file({_A: {"shape": [2, 3], "data_offsets": [0, 24]}}, b"\0" * 24),
    "extra entry field": _header_file({_A: {**_entry(), "evil": 1}}, b"\0" * 24),
    "duplicate keys": _header_file(None, raw=(f'{{"{_A}":{{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}},'
                                              f'"{_A}":{{"dtype":"F32","shape":[2,3],"data_offsets":[24,48]}}}}').encode(),
                                   data=b"\0" * 48),
    "no tensors": _header_file({}),
    "only metadata": _header_file({"__metadata__": {"format": "pt"}}),
    "key with NUL": _header_file({"base_model.model.l.0.q\u0000.lora_A.weight": _entry()}, b"\0" * 24),
    "key with ../": _header_file({"base_model.model.../../etc.q.lora_A.weight": _entry()}, b"\0" * 24),
    "key 1 MB long": _header_file({"base_model.model." + "a." * 500_000 + "q.lora_A.weight": _entry()}, b"\0" * 24),
    "key empty": _header_file({"": _entry()}, b"\0" * 24),
    "key RTL override": _header_file({"base_model.model.l.0.\u202eq.lora_A.weight": _entry()}, b"\0" * 24),
    "20k tensors": _header_file({f"base_model.model.l.{i}.q.lora_A.weight": _entry(shape=[0], offsets=[0, 0])
                                for i in range(20_000)}),
    "scalar tensors": _header_file({_A: _entry(shape=[], offsets=[0, 4]), _B: _entry(shape=[], offsets=[4, 8])}, b"\0" * 8),
    "zero-size tensors": _header_file({_A: _entry(shape=[0, 3], offsets=[0, 0]), _B: _entry(shape=[4, 0], offsets=[0, 0])}),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header(adapter_copy: Path, case: str) -> None:
    outcomes = _mutated(adapter_copy, CRAFTED[case], case)
    STATS.count("safetensors-crafted")
    expect_clean(outcomes)
    assert outcomes[0].kind == "typed" or outcomes[0].value, f"{case}: accepted as valid"


_dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E5M2", "f32", "", "F32 ", "Q4"])
_dims = st.one_of(st.integers(0, 6), st.integers(-3, 2**64 + 3), st.sampled_from([2**63, 2**32 + 1]))
_json_atoms = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=8))
_keys = st.one_of(st.sampled_from([_A, _B, "__metadata__", "prompt_embeddings", "base_model.model.l.0.q.ia3_l"]),
                  st.text(max_size=40))
_entries = st.one_of(
    st.fixed_dictionaries({"dtype": _dtypes, "shape": st.lists(_dims, max_size=4),
                           "data_offsets": st.lists(st.integers(-2, 2**64 + 2), min_size=0, max_size=3)}),
    st.fixed_dictionaries({"dtype": _dtypes, "shape": st.lists(st.integers(0, 4), max_size=3),
                           "data_offsets": st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list)}),
    st.dictionaries(st.text(max_size=5), _json_atoms, max_size=3),
    _json_atoms,
)
_headers = st.dictionaries(_keys, _entries, max_size=5)


@settings(max_examples=500 * SCALE, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(header=_headers, data=st.binary(max_size=96), pad=st.integers(0, 9), metadata=st.dictionaries(st.text(max_size=8), _json_atoms, max_size=3))
def test_generated_headers(tmp_path_factory: pytest.TempPathFactory, header: dict, data: bytes, pad: int, metadata: dict) -> None:
    folder = _generated_folder(tmp_path_factory)
    if metadata:
        header = {**header, "__metadata__": metadata}
    raw = json.dumps(header).encode() + b" " * pad
    outcomes = _mutated(folder, struct.pack("<Q", len(raw)) + raw + data, f"generated {raw[:120]!r}")
    STATS.count("safetensors-generated")
    expect_clean(outcomes)


_FOLDER: dict[str, Path] = {}


def _generated_folder(factory: pytest.TempPathFactory) -> Path:
    # hypothesis re-runs the test body many times; one scratch copy of the good adapter serves them all
    if "f" not in _FOLDER:
        import atexit
        import tempfile

        from hardening_harness import LORA_CONFIG, lora_tensors, scratch_root

        root = scratch_root()
        base = Path(tempfile.mkdtemp(prefix="adapterspec-hardening-", dir=root)) if root else factory.mktemp("gen")
        atexit.register(shutil.rmtree, base, True)
        _FOLDER["f"] = adapterspec.write_adapter(base / "lora", LORA_CONFIG, lora_tensors())
        (_FOLDER["f"] / "adapter_config.json").write_text(json.dumps(LORA_CONFIG), "utf-8")
    return _FOLDER["f"]


def test_valid_file_roundtrip_is_exact(good_adapter: Path) -> None:
    """The baseline the fuzzers mutate is itself valid and reads back exactly (so mutations are the only cause)."""
    from hardening_harness import lora_tensors

    assert adapterspec.validate_adapter(good_adapter) == []
    loaded = adapterspec.read_adapter(good_adapter, verify=True).load_tensors("numpy")
    expected = lora_tensors()
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_bounded_memory_on_size_claims(tmp_path: Path, good_adapter: Path) -> None:
    """Files claiming huge sizes are refused without allocating: run in a child limited to 1 GiB of address space."""
    import subprocess
    import sys
    import textwrap

    folder = Path(shutil.copytree(good_adapter, tmp_path / "big"))
    cases = {
        "header 10**18": struct.pack("<Q", 10**18) + b"{}",
        "tensor of 2**40 elements": _header_file({_A: _entry(shape=[2**20, 2**20], offsets=[0, 2**42])}, b"\0" * 24),
    }
    script = textwrap.dedent(f"""
        import resource, struct, sys, warnings
        from pathlib import Path
        warnings.simplefilter("ignore")
        import adapterspec
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
        folder = Path({str(folder)!r})
        weights = folder / {SAFETENSORS_NAME!r}
        cases = {{k: v for k, v in {cases!r}.items() if v is not None}}
        for name, blob in cases.items():
            weights.write_bytes(blob)
            problems = adapterspec.validate_adapter(folder)
            assert problems and isinstance(problems[0], adapterspec.FileFormatError), (name, problems)
        # a 20 GB sparse config file must be refused by its size, not read
        config = folder / "adapter_config.json"
        config.unlink()
        with open(config, "wb") as fh:
            fh.truncate(20 * 2**30)
        problems = adapterspec.validate_adapter(folder)
        assert problems and isinstance(problems[0], adapterspec.FileFormatError), problems
        assert "larger than" in str(problems[0]), problems
        print("bounded", len(cases) + 1)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bounded 3" in done.stdout
    STATS.count("size-claims", 3)
