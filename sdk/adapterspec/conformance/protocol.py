"""The JSON-lines protocol: test an implementation in any language, running as a separate process.

The runner starts the driver command once, writes one JSON request per line to its stdin and reads
one JSON reply per line from its stdout (stderr is free for logs). Requests carry an ``id``; the reply
echoes it. The protocol is documented in ``conformance_tests/README.md``; in short::

    -> {"id": 1, "op": "hello", "protocol": 1, "corpus": "/abs/conformance_tests/v1"}
    <- {"id": 1, "status": "ok", "name": "my-impl"}
    -> {"id": 2, "op": "load_folder", "case": {...}, "path": "/tmp/.../folder"}
    <- {"id": 2, "status": "refused", "error": "MissingTensorError", "key": "base_model.model...lora_B.weight"}
    -> {"id": 3, "op": "run_numeric", "case": {...}, "case_dir": "/abs/.../numeric/lora-linear-f32", "output_dir": "/tmp/..."}
    <- {"id": 3, "status": "ok", "outputs": {"layer": {"shape": [2, 3, 5], "data": [0.12, ...]}}}
    -> {"id": 9, "op": "shutdown"}

Every op may be answered ``{"status": "unsupported", "reason": ...}`` or ``{"status": "error", "message": ...}``.
Any reply may carry ``"warnings": [{"category": "AdapterSpecWarning", "message": ..., "pointer": "/field"}]``:
what the implementation warned about while serving the request. A driver that does so says
``"reports_warnings": true`` in its hello reply; cases expecting warnings are UNSUPPORTED for one that does not.

>>> impl = ProcessImplementation(["python", "my_driver.py"])         # doctest: +SKIP
"""

from __future__ import annotations

import json
import queue
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _io
from .cases import Case, Corpus, FolderCase, NumericCase, RoundtripCase, default_corpus_dir
from .contract import Refused, Unsupported

__all__ = ["PROTOCOL_VERSION", "DriverError", "ProcessImplementation", "decode_outputs", "encode_outputs"]

PROTOCOL_VERSION = 1


class DriverError(RuntimeError):
    """The driver process broke the protocol, crashed, timed out, or reported an error for a request."""


def encode_outputs(outputs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Arrays as the protocol sends them inline: ``{name: {"shape": [...], "data": [row-major numbers]}}``.

    >>> encode_outputs({"y": np.array([[1.0, 2.0]])})
    {'y': {'shape': [1, 2], 'data': [1.0, 2.0]}}
    """
    out = {}
    for key, value in outputs.items():
        a = _io.to_float64(value)
        out[key] = {"shape": list(a.shape), "data": a.reshape(-1).tolist()}
    return out


def decode_outputs(reply: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A ``run_numeric`` reply's outputs: inline (``outputs``) or in a safetensors file (``outputs_file``).

    >>> decode_outputs({"outputs": {"y": {"shape": [1, 2], "data": [1, 2]}}})["y"]
    array([[1., 2.]])
    """
    if "outputs_file" in reply:
        return _io.read_arrays(reply["outputs_file"])
    outputs = reply.get("outputs")
    if not isinstance(outputs, Mapping):
        raise DriverError("a run_numeric reply needs 'outputs' or 'outputs_file'")
    decoded = {}
    for key, value in outputs.items():
        try:
            decoded[key] = np.asarray(value["data"], dtype=np.float64).reshape(value["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DriverError(f"output {key!r} is not {{'shape': [...], 'data': [...]}}: {exc}") from None
    return decoded


def _case_json(case: Case) -> dict[str, Any]:
    data = case.to_json()
    data["root"] = str(case.root.resolve())
    return data


def _reply_warnings(reply: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A reply's ``warnings``: ``[{"category": str, "message": str, "pointer"?: str, "ancestors"?: [str]}]``."""
    found = reply.get("warnings", [])
    ok = isinstance(found, list) and all(
        isinstance(w, dict) and isinstance(w.get("category"), str) and isinstance(w.get("message", ""), str)
        and isinstance(w.get("pointer"), (str, type(None))) and isinstance(w.get("ancestors", []), list)
        for w in found)
    if not ok:
        raise DriverError(f"'warnings' must be a list of {{category, message, pointer?}} objects; got {str(found)[:200]}")
    return [dict(w) for w in found]


class ProcessImplementation:
    """An implementation running as a driver process that speaks the protocol.

    :param argv: the command (``["node", "driver.js"]``); started on first use, restarted after a crash.
    :param timeout: seconds to wait for each reply.
    :param cwd: the driver's working directory.
    """

    def __init__(self, argv: Sequence[str], *, timeout: float = 120.0, cwd: str | Path | None = None) -> None:
        if not argv:
            raise ValueError("cmd: needs a command")
        self.argv = list(argv)
        self.timeout = timeout
        self.cwd = cwd
        self.name = Path(self.argv[-1]).name
        self.checks_error_class = True
        self.reports_warnings = False
        self._warnings: list[dict[str, Any]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=40)
        self._next_id = 0
        self._corpus: str = ""
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    # -- process management ------------------------------------------------------------------
    def _start(self, corpus: str) -> None:
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1, cwd=self.cwd)
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self._proc.stdout, self._lines), daemon=True).start()
        threading.Thread(target=self._drain, args=(self._proc.stderr,), daemon=True).start()
        self._corpus = corpus
        reply = self._request({"op": "hello", "protocol": PROTOCOL_VERSION, "corpus": corpus})
        if reply.get("status") != "ok":
            raise DriverError(f"the driver refused the hello: {reply}")
        self.name = str(reply.get("name") or self.name)
        self.checks_error_class = bool(reply.get("checks_error_class", True))
        self.reports_warnings = bool(reply.get("reports_warnings", False))

    @staticmethod
    def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    def _drain(self, stream: Any) -> None:
        for line in stream:
            self._stderr.append(line.rstrip("\n"))

    def _stderr_tail(self) -> str:
        tail = "\n".join(list(self._stderr)[-8:])
        return f"; driver stderr:\n{tail}" if tail else ""

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Ask the driver to exit (``shutdown``), and make sure it does."""
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
        if self._proc is None:
            return
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({"id": self._next_id + 1, "op": "shutdown"}) + "\n")
            self._proc.stdin.flush()
            self._proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
        self._kill()

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._next_id += 1
        message = {"id": self._next_id, **message}
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except (OSError, ValueError) as exc:
            self._kill()
            raise DriverError(f"cannot write to the driver ({exc}){self._stderr_tail()}") from None
        while True:
            try:
                line = self._lines.get(timeout=self.timeout)
            except queue.Empty:
                self._kill()
                raise DriverError(f"no reply to {message['op']} within {self.timeout:g}s{self._stderr_tail()}") from None
            if line is None:
                self._kill()
                raise DriverError(f"the driver exited during {message['op']}{self._stderr_tail()}")
            try:
                reply = json.loads(line)
            except ValueError:
                self._kill()
                raise DriverError(f"the driver wrote a line that is not JSON: {line[:200]!r}") from None
            if not isinstance(reply, dict):
                self._kill()
                raise DriverError(f"the driver wrote a line that is not a JSON object: {line[:200]!r}")
            if reply.get("id") != message["id"]:  # a reply carries its request's id; requests go one at a time
                self._kill()
                raise DriverError(f"the driver replied to {message['op']} (request id {message['id']}) with id "
                                  f"{reply.get('id')!r}: a reply carries the id of the request it answers")
            return reply

    def begin(self, corpus: Corpus) -> None:
        """Called by the runner before the first case: the driver starts (and gets the corpus path) on first use."""
        if str(corpus.root.resolve()) != self._corpus:
            self._kill()
        self._corpus = str(corpus.root.resolve())

    def _call(self, op: str, case: Case | None, **fields: Any) -> dict[str, Any]:
        if case is not None and not self._corpus:
            self._corpus = str(case.root.resolve())
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start(self._corpus or str(default_corpus_dir().resolve()))
        if case is not None:
            fields = {"case": _case_json(case), **fields}
        reply = self._request({"op": op, **fields})
        self._warnings += _reply_warnings(reply)
        status = reply.get("status")
        if status == "ok":
            return reply
        if status == "unsupported":
            raise Unsupported(str(reply.get("reason") or "unsupported by the driver"))
        if status == "refused":
            raise Refused(str(reply.get("error")), key=reply.get("key"), pointer=reply.get("pointer"),
                          message=str(reply.get("message") or ""))
        raise DriverError(f"{op}: {reply.get('message') or reply}")

    def take_warnings(self) -> list[dict[str, Any]]:
        """The warnings the driver reported since the last call (the runner calls it after each case)."""
        taken, self._warnings = self._warnings, []
        return taken

    # -- the Implementation methods ------------------------------------------------------------
    def supports(self, case: Case) -> bool | str:
        return True  # the driver answers "unsupported" per request

    def validate_config(self, config: Any) -> None:
        self._call("validate_config", None, config=config)

    def load_folder(self, case: FolderCase, path: Path) -> None:
        self._call("load_folder", case, path=str(Path(path).resolve()))

    def run_numeric(self, case: NumericCase, case_dir: Path) -> dict[str, np.ndarray]:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="adapterspec-driver-")
        output_dir = Path(tempfile.mkdtemp(dir=self._scratch.name))
        reply = self._call("run_numeric", case, case_dir=str(Path(case_dir).resolve()), output_dir=str(output_dir))
        return decode_outputs(reply)

    def roundtrip(self, case: RoundtripCase, src: Path, dst: Path) -> None:
        source = _case_json(case.source) if case.source is not None else None
        self._call("roundtrip", case, source=source, src=str(Path(src).resolve()), dst=str(Path(dst).resolve()))
