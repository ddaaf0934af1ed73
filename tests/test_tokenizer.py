"""GPT-2 BPE against GPT2TokenizerFast and tiktoken (independent implementations)."""

import pytest
import tiktoken
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe

from jaxformer.gpt2.tokenizer import GPT2Tokenizer

SAMPLES = [
    "Hello world", " leading space", "trailing  spaces   ", "tabs\tand\nnewlines\r\n\n",
    "Ünïcödé café naïve – “quotes” …", "日本語のテキスト", "emoji 🤖🚀 and 👩‍👩‍👧", "don't you'll I'm we've",
    "numbers 1234567 3.14159", "<|endoftext|>", "   ", "", "a\u0301 combining", "\x00\x01 control",
]


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    return GPT2Tokenizer.from_dir(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def references(gpt2_tokenizer_dir):
    fast = transformers.GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir)
    enc = tiktoken.Encoding(
        "gpt2", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=load_tiktoken_bpe(str(gpt2_tokenizer_dir / "gpt2.tiktoken")),
        special_tokens={"<|endoftext|>": 50256})
    return fast, enc


def test_matches_hf_and_tiktoken(tok, references, data_root):
    fast, enc = references
    text = (data_root / "tinyshakespeare" / "input.txt").read_text()
    texts = SAMPLES + [text[i:i + 500] for i in range(0, 20000, 500)]
    for t in texts:
        ids = tok.encode(t)
        assert ids == fast.encode(t), t
        assert ids == enc.encode(t, allowed_special="all"), t
    assert tok.eos_id == 50256 and tok.vocab_size == 50257


def test_vocab_and_merges_files_give_the_same_encoding(tok, gpt2_tokenizer_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((gpt2_tokenizer_dir / name).read_bytes())
    from_files = GPT2Tokenizer.from_dir(tmp_path)
    for t in SAMPLES[:-4]:
        assert from_files.encode(t) == tok.encode(t)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_round_trip_arbitrary_unicode(tok, references, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == references[1].encode(text, allowed_special="all")
