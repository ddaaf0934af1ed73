"""Reading users' text files: UTF-8, with any invalid bytes replaced and reported by line."""

import warnings
from pathlib import Path

from jaxformer.errors import InputError


def read_text(path: str | Path) -> str:
    """The file's text. Bytes that are not UTF-8 become U+FFFD, with one warning naming the file, the
    first bad line and how many lines hold such bytes."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: a directory, not a text file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    bad = []
    for i, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(i)
    warnings.warn(f"{path}: line {bad[0]} is not valid UTF-8 ({len(bad)} such line(s)); invalid bytes were "
                  "replaced by U+FFFD")
    return raw.decode("utf-8", errors="replace")


def read_lines(path: str | Path) -> list[str]:
    """The file's lines (without line ends), read as :func:`read_text` does."""
    return read_text(path).splitlines()
