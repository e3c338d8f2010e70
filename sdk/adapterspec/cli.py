"""The ``adapterspec`` command line: validate (for CI and pre-commit), inspect, schema, conformance, push.

    $ adapterspec validate my-lora/ other/adapter_config.json --strict
    my-lora: ok (LORA, 56 tensors)
    other/adapter_config.json: /r: 0 is less than the minimum of 1 (fix: ...)
    $ echo $?
    1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import stat
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _access, _foreign
from ._jsonpos import member_position, syntax_error_position
from .adapter import read_adapter, validate_adapter
from ._rules import duplicate_entries, not_portable
from .config import config_problems, load_schema, read_json_file, unknown_fields_note, unsupported_features, validate_config
from .errors import AdapterSpecError, AdapterSpecWarning, ConfigError, FileFormatError, UnsupportedError, shorten
from .folder import list_adapters
from .naming import parse_key
from .spec import (
    CONFIG_NAME,
    MANIFEST_NAME,
    METADATA_SHA256,
    METADATA_VERSION,
    PICKLE_NAME,
    SAFETENSORS_NAME,
    SPEC_VERSION,
)

__all__ = ["REPORT_VERSION", "main", "package_version", "report", "validate_targets"]

#: Version of the ``--format json`` report (schema: ``adapterspec/_schema/validate_report.v1.schema.json``).
#: A new minor adds optional fields; a new major changes or removes some.
REPORT_VERSION = "1.0"

#: At most this many errors are reported per config or adapter (the rest are counted in ``errors_omitted``).
MAX_ERRORS = 50


@dataclass
class Result:
    """The outcome of validating one config file or adapter folder (errors and warnings as report dicts)."""

    target: str
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    summary: str = ""
    errors_omitted: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def add_errors(self, errors: Sequence[AdapterSpecError]) -> None:
        room = max(MAX_ERRORS - len(self.errors), 0)
        self.errors.extend(_error(e) for e in errors[:room])
        self.errors_omitted += max(len(errors) - room, 0)


def _where(file: str | None, pointer: str | None) -> dict[str, int]:
    """``{"line": .., "col": ..}`` of the syntax error in the JSON ``file``, else of the member ``pointer``
    names; ``{}`` for other files (and JSON files that are not regular files or too big to scan)."""
    if not file or not file.endswith(".json"):
        return {}
    try:
        info = os.stat(file)
    except (OSError, ValueError):
        return {}
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SCAN_BYTES:  # never block on a FIFO
        return {}
    scanned = _scan(file, info.st_mtime_ns, info.st_size)
    if scanned is None:
        return {}
    text, syntax = scanned
    found = syntax if syntax is not None or pointer is None else member_position(text, pointer)
    return {"line": found[0], "col": found[1]} if found else {}


@functools.lru_cache(maxsize=8)
def _scan(file: str, mtime_ns: int, size: int) -> tuple[str, tuple[int, int] | None] | None:
    """The text of ``file`` and its syntax error's position, once per version of the file (a config with
    50 errors is read and parsed once, not 50 times)."""
    try:
        with open(file, "rb") as fh:
            text = fh.read(MAX_SCAN_BYTES + 1).decode("utf-8")
    except (OSError, ValueError):
        return None
    return text, syntax_error_position(text)


#: JSON files larger than this are not scanned for line numbers (a config over 16 MiB is refused anyway).
MAX_SCAN_BYTES = 16 * 2**20


def _error(exc: AdapterSpecError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "pointer": exc.pointer, "key": exc.key,
            "file": exc.path, "hint": exc.hint, **_where(exc.path, exc.pointer)}


def _warning(message: str, default_file: str) -> dict[str, Any]:
    """A warning as a report dict, with the file it names (warnings start ``<path>: ``) or ``default_file``."""
    prefix = message.split(": ", 1)[0]
    return {"message": message, "file": prefix if prefix != message and os.path.exists(prefix) else default_file}


def _local(target: str) -> Path:
    if target.startswith("hf://"):
        from .hub import resolve_for_validation

        return Path(resolve_for_validation(target))
    return Path(target)


def _validate_config_file(path: Path, strict: bool) -> Result:
    result = Result(str(path))
    try:
        data = read_json_file(path)  # strict JSON: no duplicate keys, no NaN, bounded size
    except AdapterSpecError as exc:
        result.add_errors([exc])
        return result
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AdapterSpecWarning)
        result.add_errors(config_problems(data, strict=strict, path=str(path)))
    result.warnings = _warnings(caught, str(path))
    if result.ok:
        unknown = validate_config(data, strict=strict, path=str(path))  # valid: the cached answer
        notes = [f"{path}: {unknown_fields_note(unknown)}"] if unknown else []
        notes += [f"{path}: {pointer}: {note}" for pointer, note in duplicate_entries(data)]
        result.warnings += [_warning(note, str(path)) for note in notes]
        portable_notes = not_portable(data)
        for pointer, reason in unsupported_features(data):  # check 5, as for folders; a method's note unless strict
            error = UnsupportedError(reason, pointer=pointer, path=path, hint="load it with PEFT itself")
            if (pointer, reason) in portable_notes and not strict:
                result.warnings.append(_warning(f"{path}: not portable: {reason} (fix: {error.hint}; --strict fails on it)",
                                                str(path)))
            else:
                result.add_errors([error])
        result.summary = f"{data['peft_type']} config"
    return result


def _warnings(caught: list[warnings.WarningMessage], default_file: str) -> list[dict[str, Any]]:
    messages = dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, AdapterSpecWarning))
    return [_warning(m, default_file) for m in messages]


def _with_all_config_errors(errors: list[AdapterSpecError], strict: bool) -> list[AdapterSpecError]:
    """``errors`` with a config's first error replaced by all of that config's errors."""
    out: list[AdapterSpecError] = []
    for exc in errors:
        if isinstance(exc, ConfigError) and exc.path and exc.path.endswith(CONFIG_NAME):
            try:
                every = config_problems(read_json_file(exc.path), strict=strict, path=exc.path)
            except AdapterSpecError:
                every = []
            if any((e.pointer, e.message) == (exc.pointer, exc.message) for e in every):
                out.extend(every)
                continue
        out.append(exc)
    return out


def _validate_folder(folder: Path, strict: bool, allow_pickle: bool) -> list[Result]:
    error: AdapterSpecError | None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AdapterSpecWarning)
        try:
            adapters = list_adapters(folder)
        except AdapterSpecError as exc:
            adapters, error = {}, exc
        else:
            error = None
    folder_warnings = _warnings(caught, str(folder))
    if error is not None:
        result = Result(str(folder), warnings=folder_warnings)
        result.add_errors([error])
        return [result]
    results = []
    for name, path in adapters.items():
        result = Result(str(path) if len(adapters) == 1 else f"{path} [{name}]")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AdapterSpecWarning)
            errors = validate_adapter(path, allow_pickle=allow_pickle, strict=strict)
            config = None if errors else read_json_file(Path(path) / CONFIG_NAME)  # valid: just checked
            portable = config is not None and not not_portable(config)  # a reader refuses the others
            adapter = read_adapter(path, allow_pickle=allow_pickle) if portable else None
        if config is not None and not portable:
            result.summary = f"{config['peft_type']}, not portable"
        result.warnings = _warnings(caught, str(path / CONFIG_NAME))
        result.add_errors(_with_all_config_errors(errors, strict))
        if adapter is not None:
            checksum = "sha256 verified" if METADATA_SHA256 in adapter.metadata else "no checksum (PEFT-written)"
            result.summary = f"{adapter.config.peft_type}, {len(adapter.tensors)} tensors, {checksum}"
        results.append(result)
    if results:
        results[0].warnings[:0] = folder_warnings
    return results


def validate_targets(targets: Sequence[str], *, strict: bool = False, allow_pickle: bool = False) -> list[Result]:
    """Validate config files, adapter folders and folders of several adapters (``hf://`` repos too).

    A file of an adapter folder (``adapter_config.json``, ``adapter_model.safetensors``, ``adapter_model.bin``,
    the manifest ``adapterspec.json``) stands for its folder, validated once however many of its files are
    named (pre-commit passes the changed files).
    """
    results: list[Result] = []
    seen: set[Path] = set()
    for target in targets:
        try:
            path = _local(target)
            is_file = _access.is_file(path)  # a look-up refused by permissions is reported, naming the folder
            config_alone = is_file and path.name == CONFIG_NAME and not any(
                _access.exists(path.parent / weights) for weights in (SAFETENSORS_NAME, PICKLE_NAME))
            is_dir = not is_file and _access.is_dir(path)
        except AdapterSpecError as exc:
            results.append(Result(target, [_error(exc)]))
            continue
        if config_alone:
            results.append(_validate_config_file(path, strict))  # a config alone, not an adapter folder
            continue
        if is_file and path.name in FOLDER_FILES:
            path, is_dir = path.parent, True
        elif is_file and path.suffix == ".json":
            results.append(_validate_config_file(path, strict))
            continue
        if is_dir:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                results.extend(_validate_folder(path, strict, allow_pickle))
        else:
            result = Result(target)
            result.add_errors([_foreign.file_error(path, CONFIG_NAME) if is_file else FileFormatError(
                "no such file or folder", path=path, hint="check the path (a Hub repo is written hf://org/name)")])
            results.append(result)
    return results


#: The files of an adapter folder the spec names: validating one of them validates its folder.
FOLDER_FILES = frozenset({CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME, MANIFEST_NAME})


def report(results: Sequence[Result]) -> dict[str, Any]:
    """The ``--format json`` report: versioned, described by ``_schema/validate_report.v1.schema.json``."""
    return {
        "report_version": REPORT_VERSION,
        "adapterspec_version": package_version(),
        "spec_version": SPEC_VERSION,
        "valid": all(r.ok for r in results),
        "results": [{"target": r.target, "ok": r.ok, "summary": r.summary, "errors": r.errors,
                     "errors_omitted": r.errors_omitted, "warnings": r.warnings} for r in results],
    }


def _escape_data(text: str) -> str:
    """GitHub workflow-command data: ``%``, CR and LF escaped (actions/toolkit ``escapeData``)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    """GitHub workflow-command property values: like data, and ``:`` and ``,`` too (``escapeProperty``)."""
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _annotation(level: str, message: str, file: str, title: str | None = None, line: int | None = None,
                col: int | None = None) -> str:
    props = {"file": file, "line": line, "col": col, "title": title}
    text = ",".join(f"{k}={_escape_property(str(v))}" for k, v in props.items() if v is not None)
    return f"::{level} {text}::{_escape_data(message)}"


def _print_results(results: list[Result], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(report(results), indent=2))
        return
    for r in results:
        if fmt == "github":
            for e in r.errors:
                title = e["pointer"] if e["pointer"] is not None else (e["key"] or e["type"])
                print(_annotation("error", e["message"], e["file"] or r.target, title or None, e.get("line"),
                                  e.get("col")))
            if r.errors_omitted:
                print(_annotation("error", f"{r.errors_omitted} more errors not shown", r.target))
            for w in r.warnings:
                print(_annotation("warning", w["message"], w["file"]))
            continue
        if r.ok:
            print(f"{r.target}: ok ({r.summary})")
        for e in r.errors:
            print(f"{r.target}: error: {e['message']}")
        if r.errors_omitted:
            print(f"{r.target}: error: ... and {r.errors_omitted} more")
        for w in r.warnings:
            print(f"{r.target}: warning: {w['message']}")
    if fmt == "text":
        bad = sum(not r.ok for r in results)
        print(f"{len(results) - bad} valid, {bad} invalid")


def _cmd_validate(args: argparse.Namespace) -> int:
    results = validate_targets(args.paths, strict=args.strict, allow_pickle=args.allow_pickle)
    _print_results(results, args.format)
    return 0 if all(r.ok for r in results) else 1


def inspect_adapter(target: str, *, allow_pickle: bool = False) -> dict[str, Any]:
    """What ``adapterspec inspect`` prints, as a dict (method, ranks, targets, counts, size, dtypes, base model).

    ``target`` is an adapter folder, a file of one (``adapter_config.json``, ``adapter_model.safetensors``,
    ``adapter_model.bin``: it stands for its folder, as for ``validate``) or ``hf://org/name``.

    :raises FileFormatError: ``target`` is another file (a config file alone: ``validate`` checks those).
    """
    path = _local(target)
    if _is_file(path):
        if path.name not in FOLDER_FILES - {MANIFEST_NAME}:
            raise _foreign.file_error(path, CONFIG_NAME, hint=INSPECT_TAKES)  # a diffusers/kohya/mlx-lm file named so
        path = path.parent
    adapter = read_adapter(path, allow_pickle=allow_pickle)
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


#: What ``adapterspec inspect`` takes, for its refusal of anything else.
INSPECT_TAKES = (f"inspect takes an adapter folder (holding {CONFIG_NAME} and {SAFETENSORS_NAME}) or hf://org/name; "
                 "check a config file alone with 'adapterspec validate'")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _cmd_inspect(args: argparse.Namespace) -> int:
    try:
        info = inspect_adapter(args.path, allow_pickle=args.allow_pickle)
    except AdapterSpecError as exc:
        if args.format == "json":  # the error as JSON on stdout, as validate's report gives it
            print(json.dumps({"target": args.path, "ok": False, "error": _error(exc)}, indent=2))
        else:
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


def package_version() -> str:
    """The installed distribution's version (``importlib.metadata``), else the imported package's own.

    >>> package_version()                                                # doctest: +SKIP
    '0.1.0'
    """
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        return version("adapterspec")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``adapterspec`` command."""
    parser = argparse.ArgumentParser(prog="adapterspec", description="Validate, inspect and test PEFT adapters "
                                     f"against the adapterspec format (spec {SPEC_VERSION}).")
    parser.add_argument("--version", action="version",
                        version=f"adapterspec {package_version()} (spec {SPEC_VERSION})")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check configs and adapter folders; exit 1 if any is invalid")
    p.add_argument("paths", nargs="+", metavar="PATH", help="adapter_config.json files, adapter folders, "
                   "folders of several adapters, or hf://org/name")
    p.add_argument("--strict", action="store_true", help="also fail on config fields the schema does not know")
    p.add_argument("--format", choices=("text", "json", "github"), default="text",
                   help="github prints ::error/::warning annotations for GitHub Actions; json prints the report "
                   "described by `adapterspec schema validate_report` (docs/cli.md)")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (torch weights_only)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("inspect", help="method, ranks, targets, tensor and parameter counts, size, dtypes")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("schema", help="print the JSON Schema of adapter_config.json (or of the manifest, or of "
                       "the validate --format json report)")
    p.add_argument("which", nargs="?", choices=("adapter_config", "manifest", "validate_report"),
                   default="adapter_config")
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
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except AdapterSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `adapterspec schema | head`: the reader left, which is no error of ours
        _silence_stdout()
        return 1


def _silence_stdout() -> None:
    # Python flushes stdout again at exit and would print a second BrokenPipeError (Python docs, "signal")
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is no real file (captured in tests)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
