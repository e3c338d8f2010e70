"""The JSON-lines protocol, with a driver running as a separate process (tests/conformance/protocol_driver.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from adapterspec.conformance import Corpus, Status, resolve_implementation, run_suite
from adapterspec.conformance.protocol import ProcessImplementation, decode_outputs, encode_outputs

DRIVER = Path(__file__).with_name("protocol_driver.py")


def _driver(*flags: str, timeout: float = 60.0) -> ProcessImplementation:
    return ProcessImplementation([sys.executable, str(DRIVER), *flags], timeout=timeout)


def test_a_driver_process_passes_the_whole_corpus(corpus: Corpus) -> None:
    impl = _driver()
    report = run_suite(impl, corpus)
    assert impl._proc is None  # shut down after the run
    assert report.implementation == "protocol-test-driver"
    assert {r.name: r.message for r in report.results if r.status is not Status.PASSED} == {}


def test_a_broken_driver_fails_through_the_protocol(corpus: Corpus) -> None:
    report = run_suite(_driver("--transpose-b", "--no-roundtrip"), corpus,
                       include=["^numeric/(lora-linear-f32|ia3-linear-f32)$", "^roundtrip/roundtrip-lora-linear-f32$",
                                "^folder/(missing-tensor|truncated-data)$", "^schema/lora-r-negative$"])
    status = {r.name: r.status for r in report.results}
    assert status == {"numeric/lora-linear-f32": Status.FAILED, "numeric/ia3-linear-f32": Status.PASSED,
                      "roundtrip/roundtrip-lora-linear-f32": Status.UNSUPPORTED,
                      "folder/missing-tensor": Status.PASSED, "folder/truncated-data": Status.PASSED,
                      "schema/lora-r-negative": Status.PASSED}


def test_cmd_form_and_crash_recovery(corpus: Corpus) -> None:
    impl = resolve_implementation(f"cmd:{sys.executable} {DRIVER} --crash-on lora-linear-f16")
    assert isinstance(impl, ProcessImplementation)
    report = run_suite(impl, corpus, include=["^numeric/lora-linear-"])
    status = {r.name: r.status for r in report.results}
    assert status == {"numeric/lora-linear-f32": Status.PASSED, "numeric/lora-linear-f16": Status.FAILED,
                      "numeric/lora-linear-bf16": Status.PASSED}  # restarted after the crash
    (crash,) = [r for r in report.results if r.status is Status.FAILED]
    assert "the driver exited during run_numeric" in crash.message and "crashing on purpose" in crash.message


def test_a_hanging_driver_times_out(corpus: Corpus) -> None:
    report = run_suite(_driver("--hang-on", "lora-linear-f32", timeout=3.0), corpus,
                       include=["^numeric/lora-linear-(f32|f16)$"])
    status = {r.name: r.status for r in report.results}
    assert status == {"numeric/lora-linear-f32": Status.FAILED, "numeric/lora-linear-f16": Status.PASSED}
    assert "no reply to run_numeric within 3s" in report.results[0].message


#: Cases where UnsupportedError is wrong (a folder to refuse otherwise, a config, a valid folder) and one that
#: expects it (README section 2: "there, and only there" it is judged as a refusal).
UNSUPPORTED_ERROR_CASES = ["^folder/missing-tensor$", "^schema/config-is-a-list$", "^folder/lora-peft-written$",
                           "^folder/fourierft-not-portable$"]


def test_a_refused_unsupported_error_reply_is_unsupported_where_the_case_does_not_expect_it(corpus: Corpus) -> None:
    report = run_suite(_driver("--refuse-unsupported"), corpus, include=UNSUPPORTED_ERROR_CASES)
    status = {r.name: r.status for r in report.results}
    assert status == {"folder/missing-tensor": Status.UNSUPPORTED, "schema/config-is-a-list": Status.UNSUPPORTED,
                      "folder/lora-peft-written": Status.UNSUPPORTED, "folder/fourierft-not-portable": Status.PASSED}
    assert all(r.message == "not implemented here" for r in report.results if r.status is Status.UNSUPPORTED)


def test_a_reply_with_another_id_fails_its_case_naming_the_ids(corpus: Corpus) -> None:
    report = run_suite(_driver("--wrong-id-on", "lora-linear-f32", timeout=20.0), corpus,
                       include=["^numeric/lora-linear-(f32|f16)$"])
    status = {r.name: r.status for r in report.results}
    assert status == {"numeric/lora-linear-f32": Status.FAILED, "numeric/lora-linear-f16": Status.PASSED}
    message = report.results[0].message
    assert "no reply" not in message
    assert "the driver replied to run_numeric (request id 2) with id 102" in message, message


def test_outputs_travel_inline_or_as_a_file(tmp_path: Path) -> None:
    from adapterspec.conformance import _io

    y = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    assert np.array_equal(decode_outputs({"outputs": encode_outputs({"y": y})})["y"], y)
    _io.write_arrays(tmp_path / "out.safetensors", {"y": y})
    assert np.array_equal(decode_outputs({"outputs_file": str(tmp_path / "out.safetensors")})["y"], y)
    with pytest.raises(RuntimeError, match="not"):
        decode_outputs({"outputs": {"y": {"shape": [5], "data": [1, 2]}}})


def test_a_reply_that_is_not_an_object_is_a_driver_error() -> None:
    from adapterspec.conformance.protocol import DriverError

    # answers the first request with a JSON array, then waits for the next line (or EOF)
    script = "import sys; sys.stdin.readline(); print('[1, 2]', flush=True); sys.stdin.readline()"
    impl = ProcessImplementation([sys.executable, "-c", script], timeout=30.0)
    try:
        with pytest.raises(DriverError, match=r"not a JSON object: '\[1, 2\]"):
            impl._start("corpus")  # its hello
        assert impl._proc is None  # killed, as for any broken reply
    finally:
        impl._kill()


WARNING_CASES = ["^folder/(newer-minor-version|lora-duplicate-targets|metadata-version-differs)$"]


def test_warnings_travel_through_the_protocol(corpus: Corpus) -> None:
    report = run_suite(_driver(), corpus, include=WARNING_CASES)
    assert {r.name: r.message for r in report.results} == {
        "folder/newer-minor-version": "loaded, with 1 expected warning(s)",
        "folder/lora-duplicate-targets": "loaded, with 1 expected warning(s)",
        "folder/metadata-version-differs": "loaded, with 1 expected warning(s)"}
    (duplicate,) = [r for r in report.results if r.name == "folder/lora-duplicate-targets"]
    assert [w["category"] for w in duplicate.details["warnings"]] == ["AdapterSpecWarning"]
    assert "/target_modules/2: 'q_proj' is listed twice" in duplicate.details["warnings"][0]["message"]
    # a driver that does not report warnings cannot pass these cases, nor claim core with them
    report = run_suite(_driver("--no-warnings"), corpus, include=WARNING_CASES)
    assert set(report.by_status(Status.UNSUPPORTED)) == {r.name for r in report.results} and len(report.results) == 3
    assert "does not report warnings" in report.results[0].message


def test_a_malformed_warnings_list_fails_the_case() -> None:
    from adapterspec.conformance.protocol import DriverError, _reply_warnings

    assert _reply_warnings({"warnings": [{"category": "AdapterSpecWarning", "message": "m", "pointer": "/r"}]}) == [
        {"category": "AdapterSpecWarning", "message": "m", "pointer": "/r"}]
    for bad in ("AdapterSpecWarning", [{"message": "no category"}], [{"category": "W", "pointer": 3}]):
        with pytest.raises(DriverError, match="'warnings' must be a list"):
            _reply_warnings({"warnings": bad})
