"""``python -m diskimg`` runs the command-line tool."""

from diskimg.cli.main import run

run()
