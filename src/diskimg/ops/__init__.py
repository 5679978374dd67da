"""The copy operations behind ``diskimg convert``, ``compare``, ``dd``, ``commit`` and
``rebase``, one job per module:

- :mod:`.common`: chunk size, source type, opening a source;
- :mod:`.zero`: zero detection and sparse runs of a buffer (``-S``);
- :mod:`.readahead`: block-status plans of the sources, background reads and decoding;
- :mod:`.copier`: the convert copy loop writing a plan to the target;
- :mod:`.convert`, :mod:`.compare`, :mod:`.dd`: the commands;
- :mod:`.chain`: ``commit`` and ``rebase`` over backing chains;
- :mod:`.checksum`: ovirt-imageio's blkhash checksum of the guest content;
- :mod:`.bench`: qemu-img bench's sequential I/O benchmark;
- :mod:`.commands`: ``info``, ``check``, ``map``, ``measure``, ``amend``, ``snapshot``,
  ``resize`` by path (the module-level functions of :mod:`diskimg`).

Loaded on first use (``diskimg.convert`` ...): the CLI's ``info``/``check``/``map`` never
load it.  Importing the package loads none of its modules: ``diskimg.convert`` loads
:mod:`.convert` and what it uses, not :mod:`.chain` or :mod:`.compare` (start-up, issue 20).
``diskimg.operations`` re-exports every name that lived there before."""
