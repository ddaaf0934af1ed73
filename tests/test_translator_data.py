import io
import unicodedata
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxformer.errors import InputError
from jaxformer.translator import data
from jaxformer.translator import tokenizer as tk


def test_parse_two_and_three_columns_nfc_malformed():
    decomposed = unicodedata.normalize("NFD", "Ça a été")
    lines = [
        b"Go.\tVa !",
        f"It was.\t{decomposed}\tCC-BY 2.0 (France) Attribution: tatoeba.org #1 (x)".encode(),
        b"no tab here",
        b"\tempty english",
        b"\xff\xfe\tnot utf-8",
        b"",
        "Stop!\tArrête-toi !\r".encode(),
    ]
    pairs, bad = data.parse(lines)
    assert pairs == [("Go.", "Va !"), ("It was.", "Ça a été"), ("Stop!", "Arrête-toi !")]
    assert unicodedata.is_normalized("NFC", pairs[1][1]) and pairs[1][1] != decomposed
    assert bad == 3


def test_reads_zip_and_txt(tmp_path, capsys):
    text = "Hi.\tSalut.\nbroken\nCase Kept.\tÉlève Accentué.\n".encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("_about.txt", "about")
        z.writestr("fra.txt", text)
    (tmp_path / "fra-eng.zip").write_bytes(buf.getvalue())
    (tmp_path / "fra.txt").write_bytes(text)
    for name in ("fra-eng.zip", "fra.txt"):
        assert data.load_pairs(tmp_path / name) == [("Hi.", "Salut."), ("Case Kept.", "Élève Accentué.")]
        assert "skipped 1 malformed" in capsys.readouterr().err


def test_malformed_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK not really a zip")
    with pytest.raises(InputError, match="bad.zip: not a readable zip file"):
        data.load_pairs(tmp_path / "bad.zip")
    (tmp_path / "fra.txt").write_text("no tab here\n\n")
    with pytest.raises(InputError, match="fra.txt: no English-French pairs"):
        data.load_pairs(tmp_path / "fra.txt")


def test_published_file_and_split(data_root):
    """The shared zip (CI sets JAXFORMER_DATA; missing data fails here rather than skipping)."""
    pairs = data.load_pairs(data_root / "fra-eng" / "fra-eng.zip")
    assert len(pairs) == 142_787
    assert ("Run!", "Cours\u202f!") in pairs[:3]  # accents, case and the narrow no-break space kept
    splits = data.split_pairs(pairs)
    assert sum(map(len, splits.values())) == len(pairs)
    english = {k: {p[0].casefold() for p in v} for k, v in splits.items()}
    assert not english["train"] & english["valid"] and not english["train"] & english["test"]
    assert not english["valid"] & english["test"]
    assert 0.015 < len(splits["valid"]) / len(pairs) < 0.025 and 0.025 < len(splits["test"]) / len(pairs) < 0.035
    again = data.split_pairs(list(reversed(pairs)))  # independent of order
    assert {k: set(v) for k, v in again.items()} == {k: set(v) for k, v in splits.items()}


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["Hello world.", "Bonjour le monde.", "Où est la gare ?", "Where is the station?"] * 20
    return tk.train_tokenizer(corpus, 300)


def test_tokenizer_special_ids_and_unseen_characters(tokenizer):
    assert [tokenizer.token_to_id(t) for t in (tk.PAD, tk.BOS, tk.EOS)] == [0, 1, 2]
    text = "Ĳsselmeer: 日本語 ☃ Zürich — ça!"
    (ids,) = tk.encode(tokenizer, [text])
    assert ids.min() > tk.EOS_ID
    assert tk.decode(tokenizer, [list(ids) + [tk.EOS_ID, 57, 0]]) == [text]


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_tokenizer_round_trip(tokenizer, text):
    text = " ".join(unicodedata.normalize("NFC", text).split())
    (ids,) = tk.encode(tokenizer, [text])
    assert tk.decode(tokenizer, [ids]) == [text]
