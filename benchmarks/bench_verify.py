"""What ``load_adapter(..., verify=True)`` costs: the sha256 of the tensor data against a load (torch).

Run it (not a test)::

    .venv/bin/python benchmarks/bench_verify.py --repeats 21

Uses the 20 MB LoRA of ``bench_load.py``, saved again by adapterspec (PEFT writes no checksum, so
``verify=True`` on a PEFT-written folder checks nothing and costs nothing). Rows, timed in alternation:
``load_adapter`` with ``verify=False`` (the default) and ``verify=True``, and the sha256 of the file alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import Timing, build_llama, measure, measure_side_by_side, write_adapters  # noqa: E402

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args(argv)

    import adapterspec
    from adapterspec import _safetensors

    root = Path(tempfile.mkdtemp(prefix="adapterspec-bench-verify-"))
    try:
        model = build_llama()
        setup = write_adapters(model, root)
        adapterspec.load_adapter(model, setup.folder)
        folder = adapterspec.save_adapter(model, root / "with-checksum")
        adapterspec.delete_adapter(model, "default")
        weights = Path(folder) / "adapter_model.safetensors"
        assert adapterspec.read_adapter(folder).verify_checksum(), "the saved file records a sha256"
        delete = (lambda: adapterspec.delete_adapter(model, "default"))
        load = measure_side_by_side({
            "verify=False": (lambda: adapterspec.load_adapter(model, folder), delete),
            "verify=True": (lambda: adapterspec.load_adapter(model, folder, verify=True), delete)}, args.repeats)
        rows = [Timing("load", name, "torch", times) for name, times in load.items()]
        rows.append(Timing("sha256", "file alone", "torch",
                           measure(lambda: _safetensors.sha256_of_file(weights), args.repeats)))
        size = weights.stat().st_size / 1e6
        base = rows[0].best
        print(f"adapter: {size:.1f} MB fp32, adapterspec-written (sha256 in its metadata); N={args.repeats}")
        print(f"{'':24s} {'best ms':>8} {'median ms':>10} {'x load':>7}")
        for row in rows:
            print(f"{row.operation + ' ' + row.implementation:24s} {row.best * 1e3:8.1f} {row.median * 1e3:10.1f} "
                  f"{row.best / base:7.2f}")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
