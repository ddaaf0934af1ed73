"""Where data come from: one resolver for every data set, and the GPT-2 tokenizer inside the package."""

import urllib.request

import pytest

from jaxformer.data import datasets
from jaxformer.errors import InputError
from jaxformer.gpt2.tokenizer import GPT2_DIR, TOKENIZER_FILES, GPT2Tokenizer


def test_explicit_path_then_env_then_cache_then_download(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    (root / "tinyshakespeare").mkdir(parents=True)
    (root / "tinyshakespeare" / "input.txt").write_text("from the data root")
    explicit = tmp_path / "mine.txt"
    explicit.write_text("mine")
    monkeypatch.setenv(datasets.DATA_ENV, str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert datasets.locate("tinyshakespeare", explicit) == explicit
    assert datasets.locate("tinyshakespeare") == root / "tinyshakespeare" / "input.txt"
    with pytest.raises(InputError, match="holds no fra-eng/fra-eng.zip"):
        datasets.locate("fra-eng")
    with pytest.raises(InputError, match="nope.txt: no such file"):
        datasets.locate("tinyshakespeare", tmp_path / "nope.txt")

    monkeypatch.delenv(datasets.DATA_ENV)
    cached = cache / "jaxformer" / "tinyshakespeare" / "input.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("cached")
    assert datasets.locate("tinyshakespeare") == cached

    served = []

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return b"downloaded"

    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: served.append(request.full_url) or Response())
    got = datasets.locate("fra-eng")
    assert got == cache / "jaxformer" / "fra-eng" / "fra-eng.zip" and got.read_bytes() == b"downloaded"
    assert served == [datasets.DATASETS["fra-eng"].url]


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(datasets.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def offline(request, timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(InputError, match=f"put the file at {tmp_path}/jaxformer/tinyshakespeare/input.txt"):
        datasets.locate("tinyshakespeare")
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(InputError, match="no such directory"):
        datasets.locate("tinyshakespeare")


def test_gpt2_tokenizer_ships_with_the_package(gpt2_tokenizer_dir):
    """The packaged files are the published ones, byte for byte, and load without any data path."""
    for name in TOKENIZER_FILES:
        assert (GPT2_DIR / name).read_bytes() == (gpt2_tokenizer_dir / name).read_bytes(), name
    tok = GPT2Tokenizer.gpt2()
    assert tok.vocab_size == 50257 and tok.encode("Hello world") == [15496, 995]


def test_library_reads_no_environment_but_the_resolver():
    """Only jaxformer/data/datasets.py reads environment variables (train/distributed.py reads the
    launchers' own cluster variables, which JAX defines; commands/serve.py reads JAXFORMER_API_KEY,
    so that keys stay out of the process list); setting one for a library is not reading."""
    import pathlib
    import re
    package = pathlib.Path(datasets.__file__).parents[1]
    read = re.compile(r"os\.environ(?!\[[^]]*\] = )|getenv")
    readers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if read.search(p.read_text()))
    assert readers == ["commands/serve.py", "data/datasets.py", "train/distributed.py"]
