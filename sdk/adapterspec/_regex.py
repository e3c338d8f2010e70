r"""Regular expressions from configs, matched in time linear in the subject, whatever the pattern.

Python's ``re`` backtracks: ``"[a-z0-9._]*" * 16 + "X"`` spends minutes on one 60-character module
name. Here a pattern is parsed by ``re``'s own parser (Python's syntax, and ``re.error`` for what
does not compile), compiled to a Thompson NFA and run as a lazily built DFA: a character of the
subject costs one dictionary lookup once its DFA state exists, and at most one pass over the NFA's
nodes to build it -- O(len(subject) * nodes) for the whole match, by construction. Character classes
are decided by ``re`` itself, one character at a time, so ``\w``, ``(?i)`` and ``(?a)`` keep Python's
meaning. Anchors (``^ $ \A \Z \b \B``) are decided from the characters beside the position.

Lookarounds (``(?!.*vision).*q_proj``: real PEFT configs use them) are each a match of their own at
the positions the NFA reaches them: O(len(subject)^2 * nodes) at worst (a lookahead inside a loop).
Backreferences, conditional groups, atomic groups and possessive repeats have no NFA: they are
refused (:class:`UnsupportedPattern`), as are patterns over :data:`MAX_NODES` NFA nodes.

>>> compile_pattern(r".*\.(q|v)_proj").fullmatch("model.layers.0.self_attn.v_proj")
True
>>> compile_pattern("[a-z0-9._]*" * 16 + "X").fullmatch("a" * 60)   # re: minutes
False
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any


def _re_module(name: str, before_311: str) -> Any:
    """One of the modules behind ``re`` (its parser already names every construct); renamed in Python 3.11."""
    try:
        return importlib.import_module(f"re.{name}")
    except ImportError:
        return importlib.import_module(before_311)


_sre_compile = _re_module("_compiler", "sre_compile")
_c = _re_module("_constants", "sre_constants")
_sre_parse = _re_module("_parser", "sre_parse")

__all__ = ["MAX_NODES", "Pattern", "UnsupportedPattern", "compile_pattern"]

#: The most NFA nodes a pattern may compile to (``(a{100}){100}`` has 10,000): bounds the cost per character.
MAX_NODES = 20_000
#: DFA states a pattern keeps; past this the cache starts again (memory stays bounded, time stays linear).
MAX_STATES = 256

_CHAR, _SPLIT, _AT, _LOOK, _SAVE, _MATCH = range(6)
_END = ""  # the transition key at the end of the subject (a character is never empty)
_LAST_NL = "\n$"  # the key of a final "\n": '$' matches before it
_WORD = {flag: _sre_compile.compile(_sre_parse.parse(r"\w", flag), flag) for flag in (_c.SRE_FLAG_UNICODE,
                                                                                     _c.SRE_FLAG_ASCII)}
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT)
_CONTEXT: dict[str, str] = {}  # character -> its representative for anchors (see _Program.context)
_UNSUPPORTED = {
    _c.GROUPREF: "a backreference", _c.GROUPREF_EXISTS: "a conditional group (?(1)...)",
    getattr(_c, "ATOMIC_GROUP", None): "an atomic group (?>...)",
    getattr(_c, "POSSESSIVE_REPEAT", None): "a possessive repeat (*+, ++, ?+)",
}


class UnsupportedPattern(ValueError):
    """A valid Python pattern this matcher cannot run in bounded time (what it uses is in the message)."""


class _Look:
    """A lookaround: its own program, run at a position; ``behind``: its fixed width, else ``None``."""

    __slots__ = ("behind", "negate", "program")

    def __init__(self, program: _Program, negate: bool, behind: int | None) -> None:
        self.program, self.negate, self.behind = program, negate, behind


class _State:
    """A DFA state: the NFA nodes reached (before their epsilon moves) and what the previous character was."""

    __slots__ = ("kernel", "prev", "looks", "moves")

    def __init__(self, kernel: tuple[int, ...], prev: str | None, looks: tuple[int, ...]) -> None:
        self.kernel, self.prev, self.looks = kernel, prev, looks
        self.moves: dict[Any, tuple[_State | None, bool]] = {}  # key -> (next state, match before this char)


class _Program:
    """A Thompson NFA (parallel lists) and its lazily built DFA."""

    def __init__(self) -> None:
        self.kind: list[int] = []
        self.arg: list[Any] = []
        self.out: list[int] = []
        self.atoms: list[tuple[Any, dict[str, bool]]] = []  # (compiled one-character re, memo)
        self.looks: list[_Look] = []
        self.start = -1
        self.anchored = False  # whether an anchor looks at the previous character
        self.states: dict[tuple[tuple[int, ...], str | None], _State] = {}

    def node(self, kind: int, arg: Any = None, out: int = -1) -> int:
        if len(self.kind) >= MAX_NODES:
            raise UnsupportedPattern(f"more than {MAX_NODES} states when compiled (bounded repeats multiply)")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append(out)
        return len(self.kind) - 1

    # -- the DFA ------------------------------------------------------------------------
    def state(self, kernel: tuple[int, ...], prev: str | None) -> _State:
        found = self.states.get((kernel, prev))
        if found is None:
            if len(self.states) >= MAX_STATES:
                self.states = {}
            found = self.states[(kernel, prev)] = _State(kernel, prev, self._looks_from(kernel))
        return found

    def _looks_from(self, kernel: tuple[int, ...]) -> tuple[int, ...]:
        """The lookarounds an epsilon path from ``kernel`` may reach (their truth is part of a move's key)."""
        seen, stack, looks = set(kernel), list(kernel), []
        kind, out, arg = self.kind, self.out, self.arg
        while stack:
            i = stack.pop()
            k = kind[i]
            if k == _LOOK:
                looks.append(arg[i])
            nxt = arg[i] if k == _SPLIT else (out[i],) if k in (_AT, _LOOK, _SAVE) else ()
            for j in nxt:
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return tuple(sorted(looks))

    def closure(self, kernel: tuple[int, ...], prev: str | None, nxt: str | None, last: bool,
                truth: Callable[[int], bool]) -> tuple[list[int], bool]:
        """The character nodes reachable by epsilon moves between ``prev`` and ``nxt`` (``None``: the
        subject's start or end), in priority order, and whether the match node is reachable."""
        kind, out, arg = self.kind, self.out, self.arg
        seen: set[int] = set()
        chars: list[int] = []
        matched = False
        stack = list(reversed(kernel))
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            k = kind[i]
            if k == _CHAR:
                chars.append(i)
            elif k == _SPLIT:
                stack.extend(reversed(arg[i]))
            elif k == _MATCH:
                matched = True
            elif k == _SAVE or (k == _AT and _at(arg[i], prev, nxt, last)) or (k == _LOOK and truth(arg[i])):
                stack.append(out[i])
        return chars, matched

    def accepts(self, atom: int, char: str) -> bool:
        compiled, memo = self.atoms[atom]
        found = memo.get(char)
        if found is None:
            found = memo[char] = compiled.match(char) is not None
        return found

    def run(self, subject: str, begin: int, end: int, *, prefix: bool) -> bool:
        """Whether the program matches ``subject[begin:p]`` for some ``p <= end`` (``prefix``), or for
        ``p == end``; anchors and lookarounds see the whole subject."""
        n = len(subject)
        if not self.looks and begin == 0 and end == n:
            return self._run_whole(subject, prefix=prefix)
        state: _State | None = self.state((self.start,), self.context(subject[begin - 1]) if begin else None)
        truth_at = _Truths(self, subject)
        for pos in range(begin, end + 1):
            assert state is not None
            char = subject[pos] if pos < n else _END
            key: Any = _LAST_NL if char == "\n" and pos == n - 1 else char
            if state.looks:
                key = (key, tuple(truth_at(look, pos) for look in state.looks))
            move = state.moves.get(key)
            if move is None:
                move = state.moves[key] = self._move(state, char, pos == n - 1, truth_at, pos)
            state, matched = move
            if matched and (prefix or pos == end):
                return True
            if state is None or pos == end:
                return False
        return False

    def _run_whole(self, subject: str, *, prefix: bool) -> bool:
        """:meth:`run` over the whole subject for a program without lookarounds (most patterns): the same
        moves, 2-3x fewer operations per character."""
        last = len(subject) - 1
        state = self.state((self.start,), None)
        truth_at = _Truths(self, subject)  # never asked: no lookaround
        for pos, char in enumerate(subject):
            key = _LAST_NL if char == "\n" and pos == last else char
            move = state.moves.get(key)
            if move is None:
                move = state.moves[key] = self._move(state, char, pos == last, truth_at, pos)
            following, matched = move
            if matched and prefix:
                return True
            if following is None:
                return False
            state = following
        move = state.moves.get(_END)
        if move is None:
            move = state.moves[_END] = self._move(state, _END, False, truth_at, last + 1)
        return move[1]

    def _move(self, state: _State, char: str, last: bool, truth_at: _Truths, pos: int) -> tuple[_State | None, bool]:
        chars, matched = self.closure(state.kernel, state.prev, char or None, last, lambda look: truth_at(look, pos))
        if not char:
            return None, matched
        kernel = tuple(dict.fromkeys(self.out[i] for i in chars if self.accepts(self.arg[i], char)))
        return (self.state(kernel, self.context(char)) if kernel else None), matched

    def context(self, char: str) -> str | None:
        """What anchors need to know of the previous character, as a representative: "\n", a word
        character in both senses ("a"), in Unicode's only ("\u00e9"), or neither ("-"); one state serves all
        characters alike. Without anchors nothing is needed ("")."""
        if not self.anchored:
            return ""
        found = _CONTEXT.get(char)
        if found is None:
            ascii_word, unicode_word = _is_word(char, _c.SRE_FLAG_ASCII), _is_word(char, _c.SRE_FLAG_UNICODE)
            found = "\n" if char == "\n" else "a" if ascii_word else "\u00e9" if unicode_word else "-"
            if len(_CONTEXT) < 65_536:
                _CONTEXT[char] = found
        return found


class _Truths:
    """Lookaround answers for one subject, computed once per (lookaround, position)."""

    __slots__ = ("memo", "program", "subject")

    def __init__(self, program: _Program, subject: str) -> None:
        self.program, self.subject = program, subject
        self.memo: dict[tuple[int, int], bool] = {}

    def __call__(self, index: int, pos: int) -> bool:
        found = self.memo.get((index, pos))
        if found is None:
            look = self.program.looks[index]
            if look.behind is None:
                found = look.program.run(self.subject, pos, len(self.subject), prefix=True)
            else:
                found = pos >= look.behind and look.program.run(self.subject, pos - look.behind, pos, prefix=False)
            found = self.memo[(index, pos)] = found != look.negate
        return found


def _is_word(char: str | None, flag: int) -> bool:
    return char is not None and _WORD[flag].match(char) is not None


def _at(code: Any, prev: str | None, nxt: str | None, last: bool) -> bool:
    """Whether the anchor ``code`` (with the flags folded in, see :func:`_anchor`) holds between two characters."""
    if code == "bos":
        return prev is None
    if code == "bol":
        return prev is None or prev == "\n"
    if code == "eos":
        return nxt is None
    if code == "eol":
        return nxt is None or nxt == "\n"
    if code == "eos_nl":  # '$' without MULTILINE: the end, or before a final newline
        return nxt is None or (nxt == "\n" and last)
    boundary, flag = code
    if prev is None and nxt is None:  # re: neither \b nor \B holds in an empty subject
        return False
    return (_is_word(prev, flag) != _is_word(nxt, flag)) == bool(boundary)


def _anchor(code: Any, flags: int) -> Any:
    multiline = bool(flags & _c.SRE_FLAG_MULTILINE)
    flag = _c.SRE_FLAG_ASCII if flags & _c.SRE_FLAG_ASCII else _c.SRE_FLAG_UNICODE
    table = {
        _c.AT_BEGINNING: "bol" if multiline else "bos", _c.AT_BEGINNING_STRING: "bos",
        _c.AT_END: "eol" if multiline else "eos_nl", _c.AT_END_STRING: "eos",
        _c.AT_BOUNDARY: (True, flag), _c.AT_NON_BOUNDARY: (False, flag),
    }
    if code not in table:
        raise UnsupportedPattern(f"the anchor {code} is not supported")
    return table[code]


_ATOMS: dict[tuple[Any, ...], tuple[Any, dict[str, bool]]] = {}  # shared: most patterns are made of the same atoms


def _atom(key: tuple[Any, ...], op: Any, av: Any, flags: int) -> tuple[Any, dict[str, bool]]:
    """A one-character pattern compiled by ``re`` and the memo of its answers, shared between patterns."""
    found = _ATOMS.get(key)
    if found is None:
        state = _sre_parse.State()
        state.flags = flags
        found = (_sre_compile.compile(_sre_parse.SubPattern(state, [(op, av)]), flags), {})
        if len(_ATOMS) < 65_536:
            _ATOMS[key] = found
    return found


class _Builder:
    """Compiles ``re``'s parse tree to a :class:`_Program`, back to front (each piece knows what follows it)."""

    def __init__(self, program: _Program, capture: int | None) -> None:
        self.p, self.capture = program, capture
        self.atom_ids: dict[tuple[Any, ...], int] = {}

    def sequence(self, items: Any, flags: int, out: int) -> int:
        for op, av in reversed(list(items)):
            out = self.item(op, av, flags, out)
        return out

    def item(self, op: Any, av: Any, flags: int, out: int) -> int:
        p = self.p
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            return p.node(_CHAR, self.atom(op, av, flags), out)
        if op is _c.SUBPATTERN:
            group, add, remove, body = av
            flags = (flags | add) & ~remove
            if group is not None and group == self.capture:
                return p.node(_SAVE, 0, self.sequence(body, flags, p.node(_SAVE, 1, out)))
            return self.sequence(body, flags, out)
        if op is _c.BRANCH:
            return p.node(_SPLIT, tuple(self.sequence(alt, flags, out) for alt in av[1]))
        if op in _REPEATS:
            return self.repeat(op is _c.MAX_REPEAT, av, flags, out)
        if op is _c.AT:
            p.anchored = True
            return p.node(_AT, _anchor(av, flags), out)
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            direction, body = av
            sub = _Program()
            _Builder(sub, None).finish(body, flags)
            width = None
            if direction < 0:
                width = body.getwidth()[0]  # re refuses a lookbehind whose width varies
            p.looks.append(_Look(sub, op is _c.ASSERT_NOT, width))
            return p.node(_LOOK, len(p.looks) - 1, out)
        what = _UNSUPPORTED.get(op, f"the construct {op}")
        raise UnsupportedPattern(f"{what} cannot be matched in linear time")

    def repeat(self, greedy: bool, av: Any, flags: int, out: int) -> int:
        low, high, body = av
        p = self.p
        if high == _c.MAXREPEAT:
            loop = p.node(_SPLIT, ())
            again = self.sequence(body, flags, loop)
            p.arg[loop] = (again, out) if greedy else (out, again)
            out = loop
        else:
            for _ in range(high - low):
                once = self.sequence(body, flags, out)
                out = p.node(_SPLIT, (once, out) if greedy else (out, once))
        for _ in range(low):
            out = self.sequence(body, flags, out)
        return out

    def atom(self, op: Any, av: Any, flags: int) -> int:
        key = (op, repr(av), flags)
        found = self.atom_ids.get(key)
        if found is None:
            self.p.atoms.append(_atom(key, op, av, flags))
            found = self.atom_ids[key] = len(self.p.atoms) - 1
        return found

    def finish(self, items: Any, flags: int) -> None:
        self.p.start = self.sequence(items, flags, self.p.node(_MATCH))


class Pattern:
    """A compiled pattern: :meth:`fullmatch` and :meth:`match` answer as ``re``'s do (``is not None``)."""

    __slots__ = ("_capture", "_capture_name", "_program", "pattern")

    def __init__(self, pattern: str, *, capture: str | None = None) -> None:
        parsed = _sre_parse.parse(pattern)  # re.error for what Python refuses
        _sre_compile.compile(pattern)  # ... including what only the compiler checks
        self.pattern = pattern
        self._capture_name = capture
        self._capture = parsed.state.groupdict.get(capture) if capture else None
        self._program = _Program()
        _Builder(self._program, self._capture).finish(parsed, parsed.state.flags)

    def __reduce__(self) -> tuple[Any, tuple[str, str | None]]:
        """Pickled as its source, compiled again on unpickling: the program's atoms are ``re`` programs compiled
        from parse trees, whose ``pattern`` is ``None`` (they would unpickle as ``re.compile(None)``, a TypeError),
        so a pickled model (``torch.save(model)``, a spawned worker) could not be loaded.

        >>> import pickle
        >>> pickle.loads(pickle.dumps(Pattern(r"(?P<m>.*)_proj", capture="m"))).match_span("q_proj")
        (0, 1)
        """
        return _unpickle, (self.pattern, self._capture_name)

    def fullmatch(self, subject: str) -> bool:
        """Whether the whole of ``subject`` matches (``re.fullmatch(pattern, subject) is not None``)."""
        return self._program.run(subject, 0, len(subject), prefix=False)

    def match(self, subject: str) -> bool:
        """Whether a prefix of ``subject`` matches (``re.match(pattern, subject) is not None``)."""
        return self._program.run(subject, 0, len(subject), prefix=True)

    def match_span(self, subject: str) -> tuple[int, int] | None:
        """``re.match(pattern, subject).span(capture)``: ``None`` without a match, ``(-1, -1)`` when the group
        took no part. A Pike VM: threads kept in ``re``'s priority order, so the first match found is the
        one backtracking finds; O(len(subject) * nodes)."""
        p = self._program
        truth_at = _Truths(p, subject)
        n = len(subject)
        threads = self._follow([(p.start, (-1, -1))], subject, 0, truth_at)
        found: tuple[int, int] | None = None
        for pos in range(n + 1):
            char = subject[pos] if pos < n else None
            advanced: list[tuple[int, tuple[int, int]]] = []
            for node, caps in threads:
                if p.kind[node] == _MATCH:  # beats the threads after it; those before it may still match
                    found = caps if caps[1] >= 0 else (-1, -1)
                    break
                if char is not None and p.accepts(p.arg[node], char):
                    advanced.append((p.out[node], caps))
            if char is None or not advanced:
                break
            threads = self._follow(advanced, subject, pos + 1, truth_at)
        return found

    def _follow(self, threads: list[tuple[int, tuple[int, int]]], subject: str, pos: int,
                truth_at: _Truths) -> list[tuple[int, tuple[int, int]]]:
        """Epsilon moves at ``pos`` from each thread in turn; a node already reached keeps its first thread."""
        p = self._program
        n = len(subject)
        prev = subject[pos - 1] if pos else None
        nxt = subject[pos] if pos < n else None
        last = pos == n - 1
        seen: set[int] = set()
        found: list[tuple[int, tuple[int, int]]] = []
        for start, start_caps in threads:
            stack = [(start, start_caps)]
            while stack:
                node, caps = stack.pop()
                if node in seen:
                    continue
                seen.add(node)
                kind = p.kind[node]
                if kind in (_CHAR, _MATCH):
                    found.append((node, caps))
                elif kind == _SPLIT:
                    stack.extend((j, caps) for j in reversed(p.arg[node]))
                elif kind == _SAVE:
                    stack.append((p.out[node], (pos, caps[1]) if p.arg[node] == 0 else (caps[0], pos)))
                elif (kind == _AT and _at(p.arg[node], prev, nxt, last)) or \
                        (kind == _LOOK and truth_at(p.arg[node], pos)):
                    stack.append((p.out[node], caps))
        return found


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str, capture: str | None = None) -> Pattern:
    """:class:`Pattern` for ``pattern``, compiled once (configs repeat their patterns across modules).

    :raises re.error: ``pattern`` is not a valid Python regular expression.
    :raises UnsupportedPattern: it uses what has no linear-time matching, or compiles too large.
    :raises RecursionError: it nests groups too deeply for ``re``'s parser.
    """
    return Pattern(pattern, capture=capture)


def _unpickle(pattern: str, capture: str | None) -> Pattern:
    return Pattern(pattern, capture=capture)
