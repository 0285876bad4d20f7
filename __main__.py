"""``python -m lorasup`` is the ``lorasup`` command."""

from lorasup.supervisor.cli import main

main()
