"""Regenerate docs/reference/cli.md from ``diskimg --help`` and ``diskimg COMMAND --help``.

    python docs/gen_cli.py            # rewrite docs/reference/cli.md
    python docs/gen_cli.py --check    # exit 1 if the committed file is out of date

The usage lines and option lists come from the parser itself; the notes, exit codes and
extra examples below are maintained here.  Every example marked runnable is executed by
tests/docs/test_docs_examples.py.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from gen_common import run

OUT = Path(__file__).resolve().parent / "reference" / "cli.md"

EXIT = "0 success, 1 error"
NOTES: dict[str, tuple[str, str, list[str]]] = {
    # command: (exit codes, notes, runnable example commands)
    "info": (EXIT, "Works without secrets and without the backing file (what it cannot read "
             "it does not show). `--backing-chain` prints every image of the chain; with "
             "`--output=json` that is a list.",
             ["diskimg create -f qcow2 disk.qcow2 64M", "diskimg info disk.qcow2",
              "diskimg info --output=json disk.qcow2"]),
    "create": (EXIT, "Prints qemu-img's `Formatting ...` line (`-q` suppresses it). `-o help` "
               "lists the format's options. `-b` needs `-F` unless `-u`. Sizes use "
               "qemu-img's grammar (`64M`, `1.5G`, bytes).",
               ["diskimg create -f qcow2 -o cluster_size=128k,lazy_refcounts=on big.qcow2 1G",
                "diskimg create -f qcow2 -b disk.qcow2 -F qcow2 overlay.qcow2",
                "diskimg create -f raw disk.raw 64M",
                "diskimg create -f qcow2 -o help"]),
    "convert": (EXIT, "Sources are concatenated. Zero runs stay holes (`-S 0` fully "
                "allocates). `-n` writes into an existing target, `-B`/`-F` give the target "
                "a backing file and copy only the top layer, `-l` picks an internal snapshot "
                "(`snapshot.name=X`, `snapshot.id=N` or `X`), `-c` compresses qcow2 clusters. "
                "`-r RATE` copies at most RATE bytes of data per second; "
                "`--target-is-zero` (with `-n`) leaves zero runs unwritten; `--salvage` "
                "turns unreadable source sectors into zeros, with a warning each. A failed "
                "convert removes the target file it created. "
                "`-W`, `-m`, `-t`, `-T`, `-C` are accepted for compatibility.",
                ["diskimg convert -p -O raw disk.qcow2 disk2.raw",
                 "diskimg convert -O qcow2 -o compat=0.10 disk.raw old.qcow2"]),
    "check": ("0 clean (also after a successful repair), 1 could not check, 2 corruptions, "
              "3 only leaks, 63 the format has no checks (raw)",
              "Plain `check` never writes. `-r leaks` repairs leaks, `-r all` also "
              "corruptions. JSON adds a `findings` list (see [json.md](json.md#check)).",
              ["diskimg check disk.qcow2", "diskimg check --output=json disk.qcow2"]),
    "compare": ("0 identical, 1 different, 2 error",
                "Without `-s` a longer image whose extra tail reads as zeros is identical "
                "(with `Warning: Image size mismatch!`); `-s` makes any size or allocation "
                "difference a mismatch.",
                ["diskimg compare disk.qcow2 disk2.raw"]),
    "map": (EXIT, "Human output lists only ranges with data and where they live; JSON lists "
            "every range (see [json.md](json.md#map)).",
            ["diskimg map disk.qcow2", "diskimg map --output=json --max-length=1M disk.qcow2"]),
    "dd": (EXIT, "`bs` (default 512), `count`, `skip` in blocks; `if`/`of` file names. The "
           "output is always a new image, every block of it written (zeros too), as "
           "qemu-img dd writes it.",
           ["diskimg dd -O qcow2 bs=1M count=16 if=disk.raw of=head.qcow2"]),
    "resize": (EXIT, "`+SIZE`/`-SIZE` are relative (a negative size needs `--` before it). "
               "qcow2 sizes must be multiples of 512, shrinking needs `--shrink`, images with "
               "internal snapshots cannot be resized (as qemu).",
               ["diskimg resize disk.raw 128M", "diskimg resize disk.qcow2 +64M"]),
    "measure": (EXIT, "Bytes a new image would need: for `--size` an empty one, for FILE a "
                "conversion of it.",
                ["diskimg measure -O qcow2 --size 10G",
                 "diskimg measure --output=json -O qcow2 disk.raw"]),
    "commit": (EXIT, "Writes the overlay's data into its backing file (or `-b BASE` further "
               "down, which implies `-d`), then empties the overlay unless `-d`. `-r RATE` "
               "commits at most RATE bytes per second. See "
               "[overlays](../howto/overlays.md).",
               ["diskimg commit overlay.qcow2"]),
    "rebase": (EXIT, "Safe by default: ranges where old and new backing files differ are "
               "copied into the image first. `-u` only rewrites the name. `-b \"\"` removes "
               "the backing file.",
               ["diskimg rebase -u -b disk.qcow2 -F qcow2 overlay.qcow2"]),
    "snapshot": (EXIT, "Internal qcow2 snapshots: `-l` lists, `-c` creates, `-a` reverts to, "
                 "`-d` deletes. Creating a snapshot when a refcount is already at the "
                 "maximum for `refcount_bits` is refused before anything is written.",
                 ["diskimg snapshot -c before-upgrade disk.qcow2", "diskimg snapshot -l disk.qcow2",
                  "diskimg snapshot -a before-upgrade disk.qcow2",
                  "diskimg snapshot -d before-upgrade disk.qcow2"]),
    "amend": (EXIT, "Changes qcow2 options in place: `compat`, `lazy_refcounts`, "
              "`refcount_bits`, `backing_file`, `backing_fmt`, `data_file`, `data_file_raw`, "
              "`size`. `diskimg amend -f qcow2 -o help` lists them. `data_file=NEW` only "
              "rewrites the external data file's name in the header of an image that has one "
              "(move the file yourself); `data_file_raw=off` clears that flag, it cannot be "
              "set. `-p` prints qemu-img's progress lines. LUKS key-slot changes need "
              "`--image-opts`, which amend does not accept yet.",
              ["diskimg amend -o lazy_refcounts=on disk.qcow2"]),
    "checksum": (EXIT, "Not in qemu-img: ovirt-imageio's blkhash checksum of the guest "
                 "content (the same value for the same content in any format, compressed, "
                 "encrypted or through a backing chain). Prints `HEXDIGEST  FILE` as "
                 "`sha256sum` does; `--output=json` prints ovirt-imageio's object (see "
                 "[json.md](json.md#checksum)). Ranges that read as zeros are not read. "
                 "See [verify a copy](../howto/checksum.md).",
                 ["diskimg checksum disk.qcow2",
                  "diskimg checksum --output=json -a sha256 -b 1M disk.qcow2"]),
}


def _run(argv: list[str]) -> tuple[int, str]:
    from diskimg.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(argv)
    return rc, out.getvalue()


def generate() -> str:
    from diskimg.cli.commands import NAMES

    rc, top = _run(["--help"])
    lines = ["# Command-line reference", "",
             "<!-- generated by docs/gen_cli.py from the --help output; do not edit by hand -->",
             "",
             "`diskimg` takes qemu-img 7.2's sub-commands, options, exit codes and output. "
             "Errors are printed as one `diskimg: message` line on stderr (exit 1), never a "
             "traceback (`--debug` or `DISKIMG_DEBUG=1` shows one). Progress (`-p`) is "
             "qemu-img's `    (NN.NN/100%)` line on stdout.", "",
             "Encrypted images are opened with `--object secret,id=ID,data=PW` (or "
             "`file=PATH`) plus `--image-opts driver=qcow2,file.filename=FILE,"
             "encrypt.key-secret=ID`; see [LUKS](../howto/luks.md).", "",
             "The storage-pool commands (`virsh` names) are described in "
             "[pools.md](../pools.md).", "",
             "## `diskimg`", "", "```text", top.rstrip(), "```", "",
             "Exit codes common to every command: 0 success, 1 error. Commands with their own "
             "codes say so below.", ""]
    for cmd in NAMES:
        rc, text = _run([cmd, "--help"])
        if rc != 0:
            raise SystemExit(f"`diskimg {cmd} --help` exited {rc}")
        exit_codes, notes, examples = NOTES.get(cmd, (EXIT, "", []))
        lines += [f"## `{cmd}`", "", "```text", text.rstrip(), "```", "",
                  f"**Exit status:** {exit_codes}.", ""]
        if notes:
            lines += [notes, ""]
        if examples:
            lines += ["<!-- test -->", "```console"] + [f"$ {e}" for e in examples] + ["```", ""]
    lines += ["## `-o help` per format", ""]
    for fmt in ("qcow2", "raw", "vmdk"):
        rc, text = _run(["create", "-f", fmt, "-o", "help"])
        lines += [f"### {fmt}", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) cli.md."""
    return run("gen_cli.py", OUT, generate, argv)


if __name__ == "__main__":
    sys.exit(main())
