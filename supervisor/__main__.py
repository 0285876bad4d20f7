"""``python -m supervisor`` is the ``lorasup`` command."""

from supervisor.cli import main

main()
