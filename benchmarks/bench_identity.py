"""What the base-model fingerprint (SPEC.md 9.1) costs a load: adapterspec-saved adapter with and without it.

Run it (not a test)::

    .venv/bin/python benchmarks/bench_identity.py [--repeats 9]

The model and adapter are ``bench_load.py``'s (synthetic Llama, hidden 1024, 16 layers; LoRA r=16 on all
seven projections: 112 modules). The adapter is saved by adapterspec (its metadata records the fingerprint);
a copy has the fingerprint key removed. Rows, timed side by side (best and median, ms):

* ``fingerprint``: the torch backend's ``adapterspec_base_identity`` alone (64 samples of each of the 112 base
  weights, hashed);
* ``load (with)`` / ``load (without)``: ``adapterspec.load_adapter`` of each copy (deleted between runs) --
  the difference is what checking the base costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_load import build_llama, measure, measure_side_by_side, write_adapters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    import safetensors
    from safetensors.torch import load_file, save_file

    import adapterspec
    from adapterspec.identity import FINGERPRINT_KEY
    from adapterspec_torch.identity import base_identity

    model = build_llama()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = write_adapters(model, root)
        adapterspec.load_adapter(model, setup.folder)
        adapterspec.save_adapter(model, root / "with")
        adapterspec.delete_adapter(model, "default")
        without = root / "without"
        without.mkdir()
        (without / "adapter_config.json").write_text((root / "with" / "adapter_config.json").read_text())
        with safetensors.safe_open(str(root / "with" / "adapter_model.safetensors"), "pt") as f:
            metadata = {k: v for k, v in (f.metadata() or {}).items() if k != FINGERPRINT_KEY and "sha256" not in k}
        save_file(load_file(root / "with" / "adapter_model.safetensors"), without / "adapter_model.safetensors",
                  metadata=metadata)

        adapterspec.load_adapter(model, root / "with")
        fingerprint = measure(lambda: base_identity(model, "default"), args.repeats)
        adapterspec.delete_adapter(model, "default")
        loads = measure_side_by_side({
            "load (with)": (lambda: adapterspec.load_adapter(model, root / "with"),
                            lambda: adapterspec.delete_adapter(model, "default")),
            "load (without)": (lambda: adapterspec.load_adapter(model, without),
                               lambda: adapterspec.delete_adapter(model, "default"))}, args.repeats)
    rows = {"fingerprint (112 modules)": fingerprint, **loads}
    print(f"{'row':28} {'best ms':>9} {'median ms':>10}")
    for label, times in rows.items():
        print(f"{label:28} {min(times) * 1e3:9.2f} {statistics.median(times) * 1e3:10.2f}")
    print(json.dumps({k: round(statistics.median(v) * 1e3, 3) for k, v in rows.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
