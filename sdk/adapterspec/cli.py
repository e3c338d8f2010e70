"""The ``adapterspec`` command line: validate (for CI and pre-commit), inspect, schema, conformance, push.

    $ adapterspec validate my-lora/ other/adapter_config.json --strict
    my-lora: ok (LORA, 56 tensors)
    other/adapter_config.json: /r: 0 is less than the minimum of 1 (fix: ...)
    $ echo $?
    1
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .adapter import read_adapter, validate_adapter
from .config import load_schema, read_json_file, validate_config
from .errors import AdapterSpecError, AdapterSpecWarning, FileFormatError, shorten
from .folder import list_adapters
from .naming import parse_key
from .spec import CONFIG_NAME, METADATA_SHA256, METADATA_VERSION, SPEC_VERSION

__all__ = ["main"]


@dataclass
class Result:
    """The outcome of validating one config file or adapter folder."""

    target: str
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors


def _error(exc: AdapterSpecError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "pointer": exc.pointer, "key": exc.key, "file": exc.path}


def _local(target: str) -> Path:
    if target.startswith("hf://"):
        from .hub import resolve_for_validation

        return Path(resolve_for_validation(target))
    return Path(target)


def _validate_config_file(path: Path, strict: bool) -> Result:
    result = Result(str(path))
    try:
        data = read_json_file(path)  # strict JSON: no duplicate keys, no NaN, bounded size
        unknown = validate_config(data, strict=strict, path=str(path))
    except AdapterSpecError as exc:
        result.errors.append(_error(exc))
        return result
    except (OSError, ValueError, RecursionError) as exc:
        result.errors.append(_error(FileFormatError(f"not a readable JSON file: {exc}", path=path)))
        return result
    if unknown:
        result.warnings.append(f"fields unknown to spec {SPEC_VERSION}: {shorten(', '.join(unknown), 300, plain=True)}")
    result.summary = f"{data['peft_type']} config"
    return result


def _validate_folder(folder: Path, strict: bool, allow_pickle: bool) -> list[Result]:
    try:
        adapters = list_adapters(folder)
    except AdapterSpecError as exc:
        return [Result(str(folder), [_error(exc)])]
    results = []
    for name, path in adapters.items():
        result = Result(str(path) if len(adapters) == 1 else f"{path} [{name}]")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AdapterSpecWarning)
            errors = validate_adapter(path, allow_pickle=allow_pickle, strict=strict)
            adapter = None if errors else read_adapter(path, allow_pickle=allow_pickle)
        result.warnings = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, AdapterSpecWarning)))
        result.errors = [_error(e) for e in errors]
        if adapter is not None:
            checksum = "sha256 verified" if METADATA_SHA256 in adapter.metadata else "no checksum (PEFT-written)"
            result.summary = f"{adapter.config.peft_type}, {len(adapter.tensors)} tensors, {checksum}"
        results.append(result)
    return results


def validate_targets(targets: Sequence[str], *, strict: bool = False, allow_pickle: bool = False) -> list[Result]:
    """Validate config files, adapter folders and folders of several adapters (``hf://`` repos too)."""
    results: list[Result] = []
    for target in targets:
        try:
            path = _local(target)
        except AdapterSpecError as exc:
            results.append(Result(target, [_error(exc)]))
            continue
        if path.is_file() and path.name != CONFIG_NAME and path.suffix == ".json":
            results.append(_validate_config_file(path, strict))
        elif path.is_file() and path.name == CONFIG_NAME:
            results.extend(_validate_folder(path.parent, strict, allow_pickle))
        elif path.is_dir():
            results.extend(_validate_folder(path, strict, allow_pickle))
        else:
            results.append(Result(target, [_error(FileFormatError("no such file or folder", path=path))]))
    return results


def _print_results(results: list[Result], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps({"valid": all(r.ok for r in results), "results": [{**asdict(r), "ok": r.ok} for r in results]},
                         indent=2))
        return
    for r in results:
        if fmt == "github":
            for e in r.errors:
                title = e["pointer"] if e["pointer"] is not None else (e["key"] or e["type"])
                print(f"::error file={e['file'] or r.target},title={title}::{e['message']}")
            for w in r.warnings:
                print(f"::warning file={r.target}::{w}")
            continue
        if r.ok:
            print(f"{r.target}: ok ({r.summary})")
        for e in r.errors:
            print(f"{r.target}: error: {e['message']}")
        for w in r.warnings:
            print(f"{r.target}: warning: {w}")
    if fmt == "text":
        bad = sum(not r.ok for r in results)
        print(f"{len(results) - bad} valid, {bad} invalid")


def _cmd_validate(args: argparse.Namespace) -> int:
    results = validate_targets(args.paths, strict=args.strict, allow_pickle=args.allow_pickle)
    _print_results(results, args.format)
    return 0 if all(r.ok for r in results) else 1


def inspect_adapter(target: str, *, allow_pickle: bool = False) -> dict[str, Any]:
    """What ``adapterspec inspect`` prints, as a dict (method, ranks, targets, counts, size, dtypes, base model)."""
    adapter = read_adapter(_local(target), allow_pickle=allow_pickle)
    cfg = adapter.config
    modules = sorted({n.module for n in (parse_key(k, cfg.peft_type, cfg) for k in adapter.tensors) if n.role == "adapter"})
    info: dict[str, Any] = {
        "path": str(adapter.path),
        "method": cfg.peft_type,
        "variant": [v for v in ("use_rslora", "use_dora", "lora_bias") if cfg.get(v)],
        "base_model": cfg.get("base_model_name_or_path"),
        "spec_version": cfg.get("adapterspec_version") or adapter.metadata.get(METADATA_VERSION) or "none (PEFT-written)",
        "target_modules": cfg.get("target_modules"),
        "adapted_modules": len(modules),
        "tensors": len(adapter.tensors),
        "parameters": adapter.num_parameters,
        "size_bytes": adapter.nbytes,
        "dtypes": dict(Counter(i.dtype for i in adapter.tensors.values())),
        "checksum": METADATA_SHA256 in adapter.metadata,
    }
    if cfg.peft_type in ("LORA", "LOHA", "LOKR"):
        info["ranks"] = dict(sorted(Counter(cfg.rank_for(m) for m in modules).items()))
        info["scaling"] = sorted({cfg.scaling_for(m) for m in modules})
    if cfg.is_prompt_learning:
        info["num_virtual_tokens"] = cfg["num_virtual_tokens"]
    return info


def _cmd_inspect(args: argparse.Namespace) -> int:
    try:
        info = inspect_adapter(args.path, allow_pickle=args.allow_pickle)
    except AdapterSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for k, v in info.items():
        if k == "size_bytes":
            v = f"{v / 2**20:.2f} MiB ({v} bytes)"
        print(f"{k.replace('_', ' '):<{width}}  {v}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(load_schema(args.which), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``adapterspec`` command."""
    parser = argparse.ArgumentParser(prog="adapterspec", description="Validate, inspect and test PEFT adapters "
                                     f"against the adapterspec format (spec {SPEC_VERSION}).")
    parser.add_argument("--version", action="version", version=f"adapterspec (spec {SPEC_VERSION})")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check configs and adapter folders; exit 1 if any is invalid")
    p.add_argument("paths", nargs="+", metavar="PATH", help="adapter_config.json files, adapter folders, "
                   "folders of several adapters, or hf://org/name")
    p.add_argument("--strict", action="store_true", help="also fail on config fields the schema does not know")
    p.add_argument("--format", choices=("text", "json", "github"), default="text",
                   help="github prints ::error annotations for GitHub Actions")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (torch weights_only)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("inspect", help="method, ranks, targets, tensor and parameter counts, size, dtypes")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("schema", help="print the JSON Schema of adapter_config.json (or of the manifest)")
    p.add_argument("which", nargs="?", choices=("adapter_config", "manifest"), default="adapter_config")
    p.set_defaults(func=_cmd_schema)

    _optional_commands(sub)
    return parser


def _optional_commands(sub: Any) -> None:
    try:
        from .conformance import cli as conformance_cli
    except ImportError:
        pass
    else:
        conformance_cli.add_parser(sub)
    try:
        from . import hub
    except ImportError:
        pass
    else:
        if hasattr(hub, "add_push_parser"):
            hub.add_push_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adapterspec`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AdapterSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
