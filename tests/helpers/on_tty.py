"""Run a command with this process's stdin as its controlling terminal, as a shell does.

``python on_tty.py ARGV...``: a new session (``setsid``), stdin (a pty's replica) made its
controlling terminal and the session's process group the terminal's foreground group, then
``exec ARGV``. What a person types (``\\x03``, Ctrl-C) then signals that whole group, as at a
real terminal.
"""

from __future__ import annotations

import fcntl
import os
import sys
import termios

os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
os.execvp(sys.argv[1], sys.argv[1:])
