"""Generic progress-bar frames for ``--trainer command``: tqdm, rich, Keras, dict lines.

What the libraries print into a pipe (from real recordings, see tests/data/bars/README.md):

- **tqdm**: ``Training:  40%|████      | 40/100 [00:10<00:15,  4.00it/s, loss=0.123]``,
  redrawn with ``\\r`` (no description: ``  40%|...``; slow steps: ``1.50s/it``; a postfix
  from ``set_postfix`` is ``loss=0.123``, from ``set_postfix_str`` anything, e.g.
  ``loss: 0.123``); no total: ``Training: 40it [00:10,  4.00it/s]``. Nested bars
  (``position=``) come on their own lines, the cursor moved with ``\\n`` and ``ESC[A``
  (which the splitter strips). Only bars counting in tqdm's default unit (``it/s``,
  ``s/it``) are read: ``examples/s``, ``MB/s`` are data, not steps.
- **rich** ``Progress`` with a count column (``MofNCompleteColumn``):
  ``Training ━━━━━━━━━━━━━━━━━━━━ 40/100 0:00:10 loss=0.123``, any column order.
- **Keras 3**: ``40/100 ━━━━━━━━━━━━━━━━━━━━ 1s 10ms/step - loss: 0.1234``; Keras 2 /
  tf.keras: ``40/100 [=====>........] - ETA: 15s - loss: 0.1234``, redrawn with ``\\b``s
  and ``\\r``. Keras counts batches of one epoch (``Epoch 2/3`` restarts at ``1/100``).
- **dict lines**: ``{'loss': 0.5, 'lr': 1e-4, 'step': 3}`` (``print(dict)``) or the JSON
  form; a ``step`` (or ``global_step``) and a ``loss``/``train_loss``/``lr``/
  ``learning_rate`` key are required (a dict with no metric is no training step).

Which bar counts the steps (:class:`BarTracker`), conservative because a false step can
stop a run:

1. a bar whose total is N (the requested steps) is the step bar, and then the only one;
2. else the first bar that advances to a step in 1..N; another bar replaces it only when
   it is complete (at its total) and the other shows a higher step (a "Loading" bar before
   the training bar), never while it is open (an evaluation bar inside training, or the
   per-epoch bar inside an epoch bar: the inner one was read from its first step);
3. a bar that goes back to a lower count with the same total (a per-epoch bar, a new bar of
   the same description, a rich task ``reset``; Keras) starts a new round and counts on:
   step = the totals of the earlier rounds + its count. The earlier round counts as
   complete even when its last frame was not drawn (rich resets a task between two
   refreshes; tqdm's ``leave=False`` clears the bar instead of drawing its end); a loop
   that leaves a round early and starts another is over-counted;
4. a bar never read at a step in 1..N gives no step past N (a ``Map: 500/500`` that jumps
   from 0 to its end is not the training).

tqdm's postfix belongs to the count it is drawn with, except when the first postfix of a bar
is drawn at count 0: then the program sets it at the end of each iteration of ``for x in
tqdm(...)`` (before tqdm counts the iteration), and a redraw at the same count shows the
next step's value; only the first frame of each count is read for such a bar. (A program
that sets a postfix before its loop and then calls ``update(1); set_postfix(...)`` looks the
same at the start and has each loss read one step late: the output cannot tell them apart.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from lorasup.supervisor.events import Step
from lorasup.supervisor.numbers import read_count, read_float, read_step

#: substrings one of which is in every line these parsers read something from
NEEDLES = ("%|", "it/s", "s/it", "━", "] - ", "step")

#: lines longer than this are no bar frame (keeps every search bounded)
MAX_FRAME = 4096
#: distinct bars remembered per run; later ones are ignored
MAX_BARS = 64

_NUMBER = r"[-+]?(?:\d{1,40}+(?:\.\d{0,40}+)?|\.\d{1,40}+)(?:[eE][-+]?\d{1,5}+)?|[-+]?(?i:nan|inf)"
_LOSS = re.compile(r"(?<![\w.])(?:train[_ ])?(?:[Ll]oss|LOSS)\s{0,3}+[:=]\s{0,3}+(?P<v>"
                   + _NUMBER + ")")
_LR = re.compile(r"(?<![\w.])(?:lr|LR|[Ll]earning[_ ]rate)\s{0,3}+[:=]\s{0,3}+(?P<v>"
                 + _NUMBER + ")")

# tqdm: matched from the ``|`` after the percentage (found with str.find) onwards
_TQDM = re.compile(r"\|[^|\r\n]{0,1000}+\|\s{0,20}+(\d{1,13}+)/(\d{1,13}+)\s{0,5}+"
                   r"\[([^\]\r\n]{0,1000}+)\]")
_TQDM_NO_TOTAL = re.compile(r"(\d{1,13}+)it \[([^\]\r\n]{0,1000}+)\]")
_PERCENT = re.compile(r"(\d{1,3}+)$")
# a count token standing alone: ``40/100`` (not ``1/2/3``, a date, ``ms/step``, a ratio)
_COUNT = re.compile(r"(?<![\w/.:])(\d{1,13}+)/(\d{1,13}+)(?![\w/.:])")
_RICH_BAR = re.compile(r"[━╸╺]{2,400}+")
_KERAS = re.compile(r"\s{0,20}+(\d{1,13}+)/(\d{1,13}+) \[[=>.]{0,400}+\]")
_DIGITS = re.compile(r"\d++")
_DICT_MAX = 4096
_DICT_ITEM = re.compile(r"""['"](\w{1,64}+)['"]\s{0,3}+:\s{0,3}+"""
                        r"""(?:'([^'\\]{0,64}+)'|"([^"\\]{0,64}+)"|([-+\w.]{1,64}+))""")
_STEP_KEYS = ("step", "global_step")
_METRIC_KEYS = ("loss", "train_loss", "lr", "learning_rate")


@dataclass(frozen=True, slots=True)
class Frame:
    """One drawn frame: which bar (``key``), its count and total, and the values it shows."""

    key: str
    count: int
    total: int | None
    loss: float | None = None
    lr: float | None = None
    #: text glued after the frame (a log record with no newline before it)
    rest: str = ""


def _values(text: str) -> tuple[float | None, float | None]:
    loss = _LOSS.search(text) if ("oss" in text or "OSS" in text) else None
    lr = _LR.search(text) if ("r" in text or "R" in text) else None
    return (read_float(loss["v"]) if loss else None, read_float(lr["v"]) if lr else None)


@lru_cache(maxsize=256)
def _key(text: str) -> str:
    """A bar's identity: its description, digits left out (``Epoch 2`` is ``Epoch 1``'s)."""
    text = text.strip().rstrip(":").strip()
    return _DIGITS.sub("#", text[:200]) if text else ""


def tqdm_frame(line: str) -> Frame | None:
    """A tqdm frame counting in tqdm's default unit, with or without a total."""
    at = line.find("%|")
    if at >= 0:
        match = _TQDM.match(line, at + 1)
        if match is None:
            return None
        info = match[3]
        if "it/s" not in info and "s/it" not in info:
            return None
        percent = _PERCENT.search(line, max(0, at - 3), at)
        if percent is None:
            return None
        count, total = read_step(match[1]), read_count(match[2])
        head = line[:percent.start()]
    else:
        at = line.find("it [")
        if at < 0:
            return None
        start = at
        while start > 0 and line[start - 1].isdigit() and at - start < 13:
            start -= 1
        match = _TQDM_NO_TOTAL.match(line, start)
        if match is None or start == at:
            return None
        info = match[2]
        if "it/s" not in info and "s/it" not in info:
            return None
        count, total = read_step(match[1]), None
        head = line[:start]
    if count is None:
        return None
    postfix = info.split(",", 1)[1] if "," in info else ""
    loss, lr = _values(postfix) if postfix else (None, None)
    key = f"{_key(head)}|{total if total is not None else '-'}"
    return Frame(key, count, total, loss, lr, line[match.end():])


def rich_frame(line: str) -> Frame | None:
    """A rich progress row with a count column, or a Keras 3 frame (same bar glyphs)."""
    bar = _RICH_BAR.search(line)
    if bar is None:
        return None
    # the count nearest the bar: rich puts it after (``desc ━━━ 40/100``), Keras before
    after = _COUNT.search(line, bar.end())
    before = _COUNT.search(line, 0, bar.start())
    if after is None and before is None:
        return None
    if after is not None and (before is None
                              or after.start() - bar.end() <= bar.start() - before.end()):
        best = after
    else:
        best = before
    count, total = read_step(best[1]), read_count(best[2])
    if count is None or total is None or count > total:
        return None  # a total cut short (a partial read) or no count at all
    loss, lr = _values(line)
    head = line[:min(bar.start(), best.start())]
    return Frame(f"rich:{_key(head)}", count, total, loss, lr)


def keras_frame(line: str) -> Frame | None:
    """A Keras 2 / tf.keras progress frame: ``40/100 [====>.....] - ETA: 15s - loss: 0.12``."""
    match = _KERAS.match(line)
    if match is None:
        return None
    count, total = read_step(match[1]), read_count(match[2])
    if count is None or total is None:
        return None
    loss, lr = _values(line[match.end():])
    return Frame("keras", count, total, loss, lr)


def dict_step(line: str) -> Step | None:
    """A ``{'loss': 0.5, 'step': 3}`` or ``{"loss": 0.5, "step": 3}`` line as a step."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")) or len(text) > _DICT_MAX:
        return None
    if text.count("{") != 1 or "step" not in text:
        return None  # nested records are not a training loop's flat log line
    record: dict[str, str] = {}
    for key, single, double, plain in _DICT_ITEM.findall(text):
        record.setdefault(key, single or double or plain)
    step_text = next((record[k] for k in _STEP_KEYS if k in record), None)
    if step_text is None or not any(k in record for k in _METRIC_KEYS):
        return None
    step = read_step(step_text)
    if step is None:
        return None
    loss_text = record.get("loss", record.get("train_loss"))
    lr_text = record.get("lr", record.get("learning_rate"))
    epoch = read_count(record["epoch"]) if "epoch" in record else None
    return Step(step=step, loss=read_float(loss_text), lr=read_float(lr_text), epoch=epoch)


def read_frame(line: str) -> Frame | None:
    """The bar frame a line shows, of whichever library drew it; cheap for other lines."""
    if len(line) > MAX_FRAME:
        return None
    if "%|" in line or "it [" in line:
        frame = tqdm_frame(line)
        if frame is not None:
            return frame
    if "━" in line:
        frame = rich_frame(line)
        if frame is not None:
            return frame
    if "] - " in line:
        return keras_frame(line)
    return None


@dataclass(slots=True)
class _Bar:
    count: int = -1
    total: int | None = None
    #: the totals of earlier rounds (a bar that refilled from a lower count)
    offset: int = 0
    #: read at a step in 1..N
    low: bool = False
    #: None until its first postfix; True when that came at count 0 (see the module doc)
    early: bool | None = None


class BarTracker:
    """Frames of every bar on screen → the steps of the one that counts the training."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._bars: dict[str, _Bar] = {}
        self._current: str | None = None
        self._locked = False
        #: the step the trainer resumed after (a protocol ``resume`` line): N counts from it
        self.base = 0
        #: the highest step read so far
        self.last = 0

    def resume(self, step: int) -> None:
        """The trainer continues after ``step`` (as the gate's ``resume``)."""
        if self.last == 0:
            self.base = step

    def _in_range(self, step: int) -> bool:
        """A step in 1..N (after the resume point)."""
        return self.limit is None or self.base < step <= self.base + self.limit

    def step(self, frame: Frame) -> Step | None:
        """The step this frame shows, or None when it is not the step bar's or says nothing
        new that can be told apart from a redraw."""
        bar = self._bars.get(frame.key)
        if bar is None:
            if len(self._bars) >= MAX_BARS:
                return None
            bar = self._bars[frame.key] = _Bar()
        count, previous = frame.count, bar.count
        if bar.total is not None and frame.total == bar.total and count < previous:
            # A new round of a per-epoch bar. Its last frame is often not drawn (rich resets
            # a task between two refreshes; tqdm's leave=False clears instead of drawing the
            # end): the round that ended counts as complete.
            bar.offset += bar.total
        same_count = count == previous
        bar.count, bar.total = count, frame.total
        if bar.early is None and (frame.loss is not None or frame.lr is not None):
            bar.early = count == 0
        limit = self.limit
        if (limit is not None and frame.total in (limit, self.base + limit) and bar.offset == 0
                and not self._locked):
            self._locked, self._current = True, frame.key
        if frame.key != self._current and not self._take_over(frame, bar, previous):
            return None
        if count == 0:
            return None  # before the first step of a round: nothing new to show
        step = bar.offset + count
        if not bar.low:
            if not self._in_range(step):
                return None  # past N from a bar never read below it, or before the resume
            bar.low = True
        if bar.early and same_count:
            return None
        self.last = max(self.last, step)
        return Step(step=step, total=frame.total if bar.offset == 0 else None,
                    loss=frame.loss, lr=frame.lr)

    def _take_over(self, frame: Frame, bar: _Bar, previous: int) -> bool:
        """Whether an advancing bar other than the step bar becomes the step bar."""
        if self._locked or frame.count <= previous:
            return False
        if not self._in_range(bar.offset + frame.count):
            return False
        step = bar.offset + frame.count
        current = self._bars.get(self._current) if self._current is not None else None
        if current is not None and (current.total is None or current.count < current.total
                                    or step <= self.last):
            return False
        self._current = frame.key
        return True
