"""English–French pairs as published by manythings.org/anki (Tatoeba): locate, read, split.

The file is ``fra.txt`` (or the ``.zip`` holding it): one pair per line, tab-separated, with a
third attribution column in newer releases. Text is NFC-normalised; case and accents are kept.
"""

import hashlib
import io
import sys
import unicodedata
import zipfile
from pathlib import Path

from jaxformer.data import datasets
from jaxformer.errors import InputError


def _lines(path: Path) -> list[bytes]:
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(".txt") and not Path(n).name.startswith("_")]
                if len(names) != 1:
                    raise InputError(f"{path}: expected one data .txt in the zip, found {names}")
                return z.read(names[0]).splitlines()
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
            raise InputError(f"{path}: not a readable zip file ({e})") from None
    return path.read_bytes().splitlines()


def parse(lines: list[bytes]) -> tuple[list[tuple[str, str]], int]:
    """(English, French) pairs from raw lines, and the number of malformed lines skipped (not UTF-8,
    fewer than two columns, or an empty side). Blank lines are ignored."""
    pairs, bad = [], 0
    for raw in lines:
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            bad += 1
            continue
        if not line.strip():
            continue
        cols = line.split("\t")
        en, fr = (unicodedata.normalize("NFC", c.strip()) for c in (cols + ["", ""])[:2])
        if len(cols) < 2 or not en or not fr:
            bad += 1
            continue
        pairs.append((en, fr))
    return pairs, bad


def load_pairs(path: str | Path | None = None, report: bool = True) -> list[tuple[str, str]]:
    """Reads the pairs of ``path`` (default: the ``fra-eng`` data set, see :mod:`jaxformer.data.datasets`),
    reporting skipped malformed lines on stderr (with ``report``)."""
    path = datasets.locate("fra-eng", path)
    pairs, bad = parse(_lines(path))
    if bad and report:
        print(f"{path}: skipped {bad} malformed line(s)", file=sys.stderr)
    if not pairs:
        raise InputError(f"{path}: no English-French pairs (expected tab-separated lines)")
    return pairs


def split_of(english: str, valid: float, test: float) -> str:
    """'train', 'valid' or 'test' from a hash of the case-folded English sentence, so every pair
    sharing an English sentence lands in the same split, independent of file order."""
    h = int.from_bytes(hashlib.sha1(english.casefold().encode()).digest()[:8], "big") / 2**64
    return "test" if h < test else "valid" if h < test + valid else "train"


def split_pairs(pairs, valid: float = 0.02, test: float = 0.03) -> dict[str, list[tuple[str, str]]]:
    """Deterministic train/valid/test split in file order; no English sentence is in two splits."""
    out = {"train": [], "valid": [], "test": []}
    for p in pairs:
        out[split_of(p[0], valid, test)].append(p)
    return out


def write_split(pairs, prefix: Path) -> None:
    """Writes ``prefix.en`` and ``prefix.fr``, one sentence per line (UTF-8)."""
    for i, suffix in enumerate(("en", "fr")):
        with io.open(f"{prefix}.{suffix}", "w", encoding="utf-8") as f:
            f.writelines(p[i] + "\n" for p in pairs)
