"""Problems the trainer showed and signals lorasup sent, judged together.

After lorasup's own SIGINT, the traceback a Python trainer prints is the trainer being
stopped, not a trainer problem. Which lines are that is the adapter's rule
(``AdapterBase.expected_exit``): the report holds a traceback line until the exception
line says which it was.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

from lorasup.supervisor.report.values import MAX_PROBLEMS, MAX_SIGNALS, to_int

#: (problem, line) -> True: the stop; None: cannot tell yet; False: a problem
ExitRule = Callable[[str, str], "bool | None"]

EXPECTED = "after lorasup's SIGINT (the trainer being stopped)"


class Problems:
    """Problem lines counted by (problem, line), and the signals sent; bounded."""

    def __init__(self, rule: ExitRule) -> None:
        self.rule = rule
        self.entries: dict[tuple[str, ...], dict[str, Any]] = {}
        self.dropped = 0
        #: lorasup sent SIGINT; a traceback line seen after it, not yet judged
        self.sigint_seen = False
        self.recent: collections.deque[tuple[str, str, float | None]] = (
            collections.deque(maxlen=16))
        self.pending: tuple[str, str, float | None, str | None] | None = None
        self.signals: list[dict[str, Any]] = []
        self.signals_dropped = 0

    def judge(self, problem: str, line: str, t: float | None) -> None:
        if not self.sigint_seen:
            self.recent.append((problem, line, t))
            self._add(problem, line, t, None)
            return
        # in file order: a problem's t is its read's time, not later
        pending, self.pending = self.pending, None
        verdict = self.rule(problem, line)
        if verdict is None:  # a traceback: its exception line will say what it was
            if pending is not None:
                self._add(*pending)
            self.pending = (problem, line, t, None)
            return
        if verdict:
            if pending is not None:
                self._add(pending[0], pending[1], pending[2], EXPECTED)
            self._add(problem, line, t, EXPECTED)
            return
        if pending is not None:
            self._add(*pending)
        self._add(problem, line, t, None)

    def _add(self, problem: str, line: str, t: float | None, expected: str | None) -> None:
        key = (problem, line) if expected is None else (problem, line, "expected")
        entry = self.entries.get(key)
        if entry is not None:
            entry["count"] += 1
        elif len(self.entries) < MAX_PROBLEMS:
            entry = {"problem": problem, "line": line, "count": 1, "first_t": t}
            if expected is not None:
                entry["expected"] = expected
            self.entries[key] = entry
        else:
            self.dropped += 1

    def on_signal(self, r: dict[str, Any], t: float | None) -> None:
        if len(self.signals) >= MAX_SIGNALS:
            self.signals_dropped += 1
            return
        pids = r.get("pids")
        pid_list = ([p for p in map(to_int, pids[:1000]) if p is not None]
                    if isinstance(pids, list) else [])
        if r.get("signal") == "SIGINT" and not self.sigint_seen:
            self.sigint_seen = True
            # Output the signal caused may be in the file before the signal's record (two
            # readers, one file): problems at or after its time are judged again.
            again = []
            while (self.recent and t is not None
                   and (self.recent[-1][2] or -math.inf) >= t):
                again.append(self.recent.pop())
            for problem, line, at in reversed(again):
                entry = self.entries.get((problem, line))
                if entry is not None:
                    entry["count"] -= 1
                    if not entry["count"]:
                        del self.entries[(problem, line)]
                self.judge(problem, line, at)
        self.signals.append({"signal": str(r.get("signal", ""))[:40],
                             "reason": str(r.get("reason", ""))[:200], "t": t,
                             "pids": pid_list})

    def as_list(self) -> list[dict[str, Any]]:
        problems = [dict(p) for p in self.entries.values()]
        pending = self.pending
        if pending is not None:  # a traceback after SIGINT whose exception line never came
            key = pending[:2]
            known = self.entries.get(key)
            if known is not None:
                at = list(self.entries).index(key)
                problems[at]["count"] += 1
            else:
                problems.append({"problem": pending[0], "line": pending[1], "count": 1,
                                 "first_t": pending[2]})
        return problems
