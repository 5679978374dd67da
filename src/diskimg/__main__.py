"""``python -m diskimg`` runs the command-line tool."""

import sys

from diskimg.cli.main import main

sys.exit(main())
