"""``python -m supervisor`` is the ``lorasup`` command."""

from supervisor.cli import app

app(prog_name="lorasup")
