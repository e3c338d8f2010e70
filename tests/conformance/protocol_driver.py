"""A conformance driver speaking the JSON-lines protocol, for the tests (runs as its own process).

It wraps the reference implementation (adapterspec's core + the float64 NumPy math), the way a
driver in another language would wrap its own library. Flags make it misbehave on purpose:

    python protocol_driver.py                  # correct
    python protocol_driver.py --transpose-b    # reads lora_B as if it were stored [r, out]
    python protocol_driver.py --no-roundtrip   # answers "unsupported" to roundtrip requests
    python protocol_driver.py --crash-on ID    # exits in the middle of the case with this id
    python protocol_driver.py --hang-on ID     # never answers the case with this id
    python protocol_driver.py --no-warnings    # does not report warnings (nor say it does)
    python protocol_driver.py --refuse-unsupported  # answers every case "refused" with UnsupportedError at /peft_type
    python protocol_driver.py --wrong-id-on ID  # answers the case with this id under another request id
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from adapterspec.conformance import load_corpus
from adapterspec.conformance.contract import Refusal
from adapterspec.conformance.protocol import encode_outputs
from adapterspec.conformance.reference_impl import ReferenceImplementation


class TransposedB(ReferenceImplementation):
    """Reads every lora_B as if stored [r, out]: the same shape after the misreading, wrong values."""

    def tensors(self, adapter: Any) -> dict[str, np.ndarray]:
        arrays = super().tensors(adapter)
        for key, value in arrays.items():
            if key.endswith(("lora_B.weight", "lora_embedding_B")):
                flat = value.reshape(value.shape[0], -1)
                arrays[key] = flat.reshape(flat.shape[1], flat.shape[0]).T.reshape(value.shape)
        return arrays


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transpose-b", action="store_true")
    parser.add_argument("--no-roundtrip", action="store_true")
    parser.add_argument("--crash-on", default=None)
    parser.add_argument("--hang-on", default=None)
    parser.add_argument("--no-warnings", action="store_true")
    parser.add_argument("--refuse-unsupported", action="store_true")
    parser.add_argument("--wrong-id-on", default=None)
    args = parser.parse_args()
    impl = TransposedB() if args.transpose_b else ReferenceImplementation()
    cases: dict[str, Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        reply: dict[str, Any] = {"id": request["id"]}
        if op == "shutdown":
            return 0
        if op == "hello":
            cases = {c.name: c for c in load_corpus(request["corpus"]).cases}
            reply |= {"status": "ok", "name": "protocol-test-driver", "reports_warnings": not args.no_warnings}
        else:
            case = cases.get(request.get("case", {}).get("name", ""))
            cid = request.get("case", {}).get("id")
            if cid is not None and cid == args.crash_on:
                print("crashing on purpose", file=sys.stderr, flush=True)
                return 3
            if cid is not None and cid == args.hang_on:
                time.sleep(3600)
            if cid is not None and cid == args.wrong_id_on:
                reply["id"] = request["id"] + 100
            if args.refuse_unsupported:
                reply |= {"status": "refused", "error": "UnsupportedError", "key": None, "pointer": "/peft_type",
                          "message": "not implemented here"}
                print(json.dumps(reply), flush=True)
                continue
            caught: list[warnings.WarningMessage] = []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    serve(impl, op, request, case, reply, args.no_roundtrip)
            except Exception as exc:  # noqa: BLE001 - every refusal goes back to the runner
                refusal = Refusal.from_exception(exc)
                reply |= {"status": "refused", **refusal.to_json()}
            if caught and not args.no_warnings:
                reply["warnings"] = [{"category": w.category.__name__, "message": str(w.message)} for w in caught]
        print(json.dumps(reply), flush=True)
    return 0


def serve(impl: ReferenceImplementation, op: str, request: dict[str, Any], case: Any, reply: dict[str, Any],
          no_roundtrip: bool) -> None:
    """Carry out one request, filling ``reply`` (an exception is the refusal)."""
    if op == "validate_config":
        impl.validate_config(request["config"])
        reply["status"] = "ok"
    elif op == "load_folder":
        impl.load_folder(case, Path(request["path"]))
        reply["status"] = "ok"
    elif op == "run_numeric":
        outputs = impl.run_numeric(case, Path(request["case_dir"]))
        reply |= {"status": "ok", "outputs": encode_outputs(outputs)}
    elif op == "roundtrip":
        if no_roundtrip:
            reply |= {"status": "unsupported", "reason": "this driver cannot save"}
        else:
            impl.roundtrip(case, Path(request["src"]), Path(request["dst"]))
            reply["status"] = "ok"
    else:
        reply |= {"status": "error", "message": f"unknown op {op!r}"}


if __name__ == "__main__":
    sys.exit(main())
