"""The ``diskimg`` command line (qemu-img 7.2 compatible).

- :mod:`~diskimg.cli.main` — the entry point: global options and the one ``except``
  that hands any error to :mod:`~diskimg.cli.errors`; it imports the rest (argparse
  included) only once a sub-command is known, so ``--version`` loads almost nothing;
- :mod:`~diskimg.cli.parser` — argument parsing: a getopt-worded argparse parser built
  for the chosen sub-command only;
- :mod:`~diskimg.cli.commands` — one module per sub-command, each declaring its usage
  line, registering its options and running it (``_shared`` holds what they share);
- :mod:`~diskimg.cli.errors` — the only place that words errors as qemu-img does, from the
  library's structured errors (path, operation, reason, notes);
- :mod:`~diskimg.cli.output` and :mod:`~diskimg.cli.progress` — qemu-img's output layouts
  and ``-p`` progress lines.
"""
