"""``python -m lorasup.supervisor`` is the ``lorasup`` command too."""

from lorasup.supervisor.cli import main

main()
