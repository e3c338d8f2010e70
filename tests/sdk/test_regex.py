"""The linear-time matcher answers as Python's ``re`` does, on generated patterns of the spec's subset
(SPEC.md 4.5) plus anchors and lookarounds, and stays linear where ``re`` backtracks for minutes."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapterspec import _regex
from adapterspec._regex import MAX_NODES, UnsupportedPattern, compile_pattern

ATOMS = ["a", "b", "_", "0", "1", r"\.", ".", "[ab]", "[^.]", "[a-z0-9._]", r"\d", r"\w", r"\s", r"\W", "[.0]"]
ANCHORS = ["^", "$", r"\b", r"\B", r"\A", r"\Z"]
SUBJECT = st.text(alphabet="ab_01.\n é", max_size=12)


def patterns(max_leaves: int = 8) -> st.SearchStrategy[str]:
    leaf = st.one_of(st.sampled_from(ATOMS), st.sampled_from(ANCHORS))

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "*?", "+?", "??", "{2}", "{1,3}", "{0,2}?", "{2,}"]))
            .map(lambda t: f"(?:{t[0]}){t[1]}"),
            inner.map(lambda p: f"({p})"),
            st.tuples(st.sampled_from(["(?=", "(?!"]), inner).map(lambda t: f"{t[0]}{t[1]})"),
            st.tuples(st.sampled_from(["(?<=", "(?<!"]), st.sampled_from(["a", r"\.", "[ab]", r"a\.", r"\w\d"]))
            .map(lambda t: f"{t[0]}{t[1]})"),
        )

    return st.recursive(leaf, extend, max_leaves=max_leaves)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(), subjects=st.lists(SUBJECT, min_size=1, max_size=6))
@example(pattern=r"(?:a|ab)(?:c|bcd)(d*)", subjects=["abcd", "acd"])
@example(pattern=r"x$", subjects=["x\n", "x\n\n", "x"])
@example(pattern=r"(?i)A[B-C]", subjects=["ab", "aC", "Ad"])
@example(pattern=r"(?m)^b$", subjects=["a\nb", "b\n"])
def test_answers_equal_re(pattern: str, subjects: list[str]) -> None:
    compiled = compile_pattern(pattern)
    for subject in subjects:
        assert compiled.fullmatch(subject) == (re.fullmatch(pattern, subject) is not None), (pattern, subject)
        assert compiled.match(subject) == (re.match(pattern, subject) is not None), (pattern, subject)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inner=patterns(max_leaves=5), subjects=st.lists(st.text(alphabet="ab_01.", max_size=14), min_size=1,
                                                       max_size=6))
@example(inner=r"a|a\.1", subjects=["x.a.1.2.", "a.1.2.3."])
@example(inner=r"(?:a\.1|a)", subjects=["x.a.1.2.y"])  # the first alternative matches later: it still wins
@example(inner="(?:layers|h)", subjects=["model.layers.12.mlp.", "transformer.h.3.attn", "h.5.x"])
def test_captured_layer_index_equals_re(inner: str, subjects: list[str]) -> None:
    """The group PEFT reads the layer index from, with re's priorities (lazy prefix, first alternative)."""
    pattern = rf"(?:^|.*?\.){inner}\.(?P<idx>\d+)\."
    compiled = compile_pattern(pattern, "idx")
    for subject in subjects:
        expected = re.match(pattern, subject)
        assert compiled.match_span(subject) == (expected.span("idx") if expected else None), (pattern, subject)


@pytest.mark.parametrize("pattern", [
    "[a-z0-9._]*" * 16 + "X",              # passed the old structural check; re: 3.4 s at 10 groups, 13.8 s at 11
    r"(.*\.)?(" + "[a-z0-9._]*" * 16 + "X)$",  # the same as a rank_pattern key, as PEFT wraps it
    "(a+)+$", "(.*)*q_proj", r"(\w+\.)*q_proj", "(a|a)*b", ".*.*.*.*.*x", "(.*a){20}",
])
def test_backtracking_bombs_cost_one_pass_per_character(pattern: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted, not timed: every character builds at most one DFA state (one closure over the NFA)."""
    compiled = compile_pattern(pattern)
    calls = 0
    closure = _regex._Program.closure

    def counting(self: _regex._Program, *args: object) -> object:
        nonlocal calls
        calls += 1
        return closure(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_regex._Program, "closure", counting)
    subject = "a" * 59 + "b"
    assert compiled.fullmatch(subject) is (pattern in ("(a|a)*b",))
    assert calls <= len(subject) + 1
    assert len(compiled._program.kind) < 1000


@pytest.mark.parametrize(("pattern", "what"), [
    (r"(a)\1", "backreference"), (r"(a)?(?(1)b|c)", "conditional"), ("(?>a*)a", "atomic"), ("a*+a", "possessive"),
    ("(?:a{100}){1000}", f"more than {MAX_NODES} states"),
])
def test_what_has_no_linear_matching_is_refused(pattern: str, what: str) -> None:
    with pytest.raises(UnsupportedPattern, match=what):
        compile_pattern(pattern)


@pytest.mark.parametrize("pattern", ["q(", "*q", "q{99999999999}", "(?P<1>q)"])
def test_invalid_patterns_raise_re_error(pattern: str) -> None:
    with pytest.raises((re.error, OverflowError)):  # re's parser raises OverflowError for huge repeats
        compile_pattern(pattern)


def test_answers_stay_right_when_the_dfa_cache_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_regex, "MAX_STATES", 2)
    pattern = r"^(?!.*vision)(?:[a-z_]+\.)*\d+\.(?:q|v)_proj$"
    compiled = _regex.Pattern(pattern)
    for subject in ["model.layers.0.q_proj", "vision.layers.1.v_proj", "model.layers.x.q_proj", "a.12.v_proj\n"]:
        assert compiled.fullmatch(subject) == (re.fullmatch(pattern, subject) is not None), subject
        assert compiled.match(subject) == (re.match(pattern, subject) is not None), subject
    assert len(compiled._program.states) <= 2
