"""Reports of a run: the per-case table and summary, JSON, and JUnit XML (for CI dashboards).

>>> from adapterspec.conformance.runner import Report, Result, Status
>>> report = Report("mine", "v1", [Result("numeric/lora-linear-f32", "numeric", Status.PASSED, "ok", 0.01)])
>>> summary_line(report)
'mine: 1 passed, 0 failed, 0 unsupported, 0 xfailed, 0 xpassed (1 cases)'
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TextIO

from .runner import Report, Result, Status

__all__ = ["format_row", "print_table", "profile_lines", "summary_line", "write_json", "write_junit"]

_LABEL = {Status.PASSED: "PASS", Status.FAILED: "FAIL", Status.UNSUPPORTED: "UNSUP", Status.XFAILED: "XFAIL",
          Status.XPASSED: "XPASS"}


def format_row(result: Result, width: int = 46) -> str:
    """One line of the table: status, case name, seconds, reason.

    >>> format_row(Result("folder/x", "folder", Status.UNSUPPORTED, "no pickles"), 10)
    'UNSUP  folder/x      0.00s  no pickles'
    """
    message = result.message.replace("\n", " ")
    if len(message) > 150:
        message = message[:147] + "..."
    return f"{_LABEL[result.status]:<5}  {result.name:<{width}}  {result.seconds:6.2f}s  {message}"


def summary_line(report: Report) -> str:
    """``name: N passed, N failed, N unsupported, N xfailed, N xpassed (N cases)``."""
    c = report.counts()
    return (f"{report.implementation}: {c['passed']} passed, {c['failed']} failed, {c['unsupported']} unsupported, "
            f"{c['xfailed']} xfailed, {c['xpassed']} xpassed ({c['total']} cases)")


def profile_lines(report: Report) -> list[str]:
    """One line per profile of the corpus: its counts, and whether the claimed one holds.

    >>> profile_lines(Report("mine", "v1", [], profile_cases={"full": ["schema/x"]}))
    ['profile full: 0 passed, 0 failed, 0 unsupported, 0 xfailed, 0 xpassed (0 of 1 cases run)', 'no case passed: the run fails']
    """
    lines = []
    for name, c in report.profile_counts().items():
        line = (f"profile {name}: {c['passed']} passed, {c['failed']} failed, {c['unsupported']} unsupported, "
                f"{c['xfailed']} xfailed, {c['xpassed']} xpassed ({c['total']} of {c['cases']} cases run)")
        if name == report.profile:
            line += " -- claimed: " + ("HOLDS" if not report.claim_problems() else "DOES NOT HOLD")
        lines.append(line)
    lines += [f"  {problem}" for problem in report.claim_problems()]
    if not report.counts()["passed"] + report.counts()["xpassed"]:
        lines.append("no case passed: the run fails")
    return lines


def print_table(report: Report, out: TextIO, *, failures_only: bool = False) -> None:
    """The table (every case, or only failures) and the summary, with failures repeated at the end.

    >>> print_table(report, sys.stdout)                                              # doctest: +SKIP
    """
    width = max((len(r.name) for r in report.results), default=10)
    for result in report.results:
        if not failures_only or result.status in (Status.FAILED, Status.XPASSED):
            print(format_row(result, width), file=out)
    failed = [r for r in report.results if r.status is Status.FAILED]
    if failed:
        print(f"\nfailed ({len(failed)}):", file=out)
        for r in failed:
            print(f"  {r.name}: {r.message}", file=out)
    print("\n" + summary_line(report), file=out)
    for line in profile_lines(report):
        print(line, file=out)


def write_json(report: Report, path: str | Path) -> None:
    """The whole report as JSON: implementation, corpus, summary counts, and every result.

    >>> write_json(report, "conformance.json")                                       # doctest: +SKIP
    """
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n", "utf-8")


def write_junit(report: Report, path: str | Path) -> None:
    """JUnit XML: one ``testcase`` per case (``classname`` = kind); unsupported and xfailed are ``skipped``.

    >>> write_junit(report, "conformance.xml")                                       # doctest: +SKIP
    """
    counts = report.counts()
    suite = ET.Element("testsuite", name=f"adapterspec-conformance[{report.implementation}]",
                       tests=str(counts["total"]), failures=str(counts["failed"] + counts["xpassed"] * report.strict_xfail),
                       errors="0", skipped=str(counts["unsupported"] + counts["xfailed"]),
                       time=f"{sum(r.seconds for r in report.results):.3f}")
    for r in report.results:
        case = ET.SubElement(suite, "testcase", classname=f"conformance.{r.kind}", name=r.name,
                             time=f"{r.seconds:.3f}")
        if r.status is Status.FAILED or (r.status is Status.XPASSED and report.strict_xfail):
            ET.SubElement(case, "failure", message=r.message[:500]).text = r.message
        elif r.status in (Status.UNSUPPORTED, Status.XFAILED):
            ET.SubElement(case, "skipped", message=f"{r.status.value}: {r.message[:500]}")
    root = ET.Element("testsuites", name="adapterspec-conformance")
    root.append(suite)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
