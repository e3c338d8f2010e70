"""``adapterspec conformance``: run the corpus against an implementation, check the corpus, list implementations.

    adapterspec conformance --impl torch                            # the built-in torch backend
    adapterspec conformance --impl cmd:"node my-driver.js" --junit report.xml
    adapterspec conformance --impl my_pkg.conf:MyImpl --include '^numeric/lora' --xfail 'dora-embedding'
    adapterspec conformance --impl cmd:"node my-driver.js" --profile core   # fails unless every core case passes
    adapterspec conformance check                                   # the corpus' own invariants
    adapterspec conformance list                                    # cases (with --include/--exclude) and impls

Exit status: 0 when some case passed and none failed (and the claimed ``--profile`` holds), 1 otherwise (or
when the corpus check found problems, or ``list`` selects nothing), 2 on bad usage or a missing corpus.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``conformance`` command to an ``argparse`` subparsers object (the ``adapterspec`` CLI's).

    >>> parser = argparse.ArgumentParser(prog="adapterspec")
    >>> p = add_parser(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["conformance", "--impl", "reference"]).impl
    'reference'
    """
    p = subparsers.add_parser(
        "conformance", help="run the conformance suite against an implementation (torch, keras, peft, your own)",
        description="Run the conformance corpus against an implementation of the adapterspec format, or check "
                    "the corpus itself. See conformance_tests/README.md.")
    p.add_argument("action", nargs="?", choices=("run", "check", "list"), default="run",
                   help="run the suite (default), check the corpus' invariants, or list cases and implementations")
    p.add_argument("--impl", default=None, metavar="IMPL",
                   help="torch | keras | peft | reference | module:object | cmd:COMMAND (default: torch)")
    p.add_argument("--corpus", default=None, metavar="DIR",
                   help="the corpus folder (default: $ADAPTERSPEC_CONFORMANCE_CORPUS, else the one installed with "
                        "the package, else conformance_tests/v1 of a source checkout)")
    p.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="run only cases whose name (kind/id) matches; repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="skip matching cases; repeatable")
    p.add_argument("--xfail", action="append", default=[], metavar="REGEX",
                   help="cases expected to fail: reported XFAIL instead of FAIL (XPASS if they pass); repeatable")
    p.add_argument("--strict-xfail", action="store_true", help="an XPASS case fails the run")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="the profile the implementation claims (core, full: corpus.json's 'profiles'): the run "
                        "fails unless every case of it passes -- an unsupported one fails it too")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--junit", default=None, metavar="PATH", help="write the report as JUnit XML")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="cmd: drivers' time limit per case")
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    p.set_defaults(func=run)
    return p


def _resolve(spec: str, timeout: float) -> Any:
    from .implementations import resolve_implementation

    impl = resolve_implementation(spec)
    if hasattr(impl, "timeout"):
        impl.timeout = timeout
    return impl


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``adapterspec conformance`` command; returns the exit status."""
    from .cases import CorpusNotFoundError, default_corpus_dir, load_corpus
    from .check import check_corpus

    root = args.corpus or default_corpus_dir()
    if args.action == "check":
        problems = check_corpus(root)
        for problem in problems:
            print(problem)
        count = len(load_corpus(root).cases) if not problems else 0
        print(f"{root}: " + (f"{len(problems)} problem(s)" if problems else f"ok ({count} cases)"))
        return 1 if problems else 0
    try:
        corpus = load_corpus(root)
    except CorpusNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.action == "list":
        from .implementations import available_implementations
        from .runner import select

        cases = select(corpus.cases if args.profile is None else corpus.in_profile(args.profile), args.include, args.exclude)
        for case in cases:
            print(f"{case.name}  [{','.join(case.profiles)}]  {case.description}")
        print(f"{len(cases)} cases; profiles: " + ", ".join(f"{name} ({len(corpus.in_profile(name))})" for name in corpus.profiles))
        print("implementations: " + ", ".join(available_implementations()))
        if not cases:
            print("error: no case selected", file=sys.stderr)
            return 1
        return 0
    from .report import format_row, profile_lines, summary_line, write_json, write_junit
    from .runner import Status, run_suite

    if args.profile is not None and args.profile not in corpus.profiles:
        print(f"error: the corpus has no profile {args.profile!r}; use one of {', '.join(corpus.profiles)}", file=sys.stderr)
        return 2
    try:
        impl = _resolve(args.impl or "torch", args.timeout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    width = 46

    def progress(result: Any) -> None:
        if not args.quiet or result.status in (Status.FAILED, Status.XPASSED):
            print(format_row(result, width), flush=True)

    report = run_suite(impl, corpus, include=args.include, exclude=args.exclude, xfail=args.xfail,
                       strict_xfail=args.strict_xfail, profile=args.profile, progress=progress)
    failed = [r for r in report.results if r.status is Status.FAILED]
    if failed:
        print(f"\nfailed ({len(failed)}):")
        for r in failed:
            print(f"  {r.name}: {r.message}")
    print("\n" + summary_line(report))
    for line in profile_lines(report):
        print(line)
    if args.json:
        write_json(report, args.json)
    if args.junit:
        write_junit(report, args.junit)
    return 0 if report.ok else 1
