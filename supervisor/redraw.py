"""Bar frames that the very next frame redraws at the same step, left out before parsing.

tqdm draws a step twice (the update, then the postfix); when both frames come in one
read, the first tells nothing the second does not, and parsing it costs the most. An
adapter whose frames are redrawn whole names their start (``AdapterBase.redraw_prefix``).
"""

from __future__ import annotations

from typing import Any

from lorasup.supervisor.fastbars import Frames


def _frame_head(line: str, prefix: str) -> str | None:
    """A bar frame's text up to its counter (``steps:  50%|█████     | 6/12``) when the line
    is nothing but that frame; None for anything else."""
    if not line.startswith(prefix) or not line.rstrip().endswith("]"):
        return None
    end = line.find(" [")
    return line[:end] if end > 0 else None


def drop_redrawn(lines: list[str], prefix: str) -> list[str]:
    """Lines without the bar frames that the very next line redraws at the same step.

    tqdm draws a step twice (the update, then the postfix); when both frames come in one
    read, the first tells nothing the second does not, and parsing it costs the most.
    """
    kept: list[str] = []
    heads = [_frame_head(line, prefix) for line in lines]
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if i < last and heads[i] is not None and heads[i] == heads[i + 1]:
            continue
        kept.append(line)
    return kept


def _frame_step(line: str, prefix: str) -> bytes | None:
    """The step counter of a bar-frame line (as bytes, like a Frames column), or None."""
    head = _frame_head(line, prefix)
    if head is None:
        return None
    return head.rsplit(" ", 1)[-1].split("/", 1)[0].encode()


def drop_redrawn_frames(items: list[Any], prefix: str) -> list[Any]:
    """What ``drop_redrawn`` does for lines, across a fast-path run's edges (lines mixed
    with :class:`Frames`): a frame that the very next frame redraws at the same step is
    left out."""
    out: list[Any] = []
    for i, item in enumerate(items):
        following = items[i + 1] if i + 1 < len(items) else None
        if type(item) is str and type(following) is Frames:
            step = _frame_step(item, prefix)
            if step is not None and step == following.columns["step"][0]:
                continue
        elif type(item) is Frames and type(following) is str:
            step = _frame_step(following, prefix)
            if step is not None and step == item.columns["step"][-1]:
                if len(item) == 1:
                    continue
                item = Frames({name: col[:-1] for name, col in item.columns.items()})
        out.append(item)
    return out
