"""GPT-2's byte-level BPE through Hugging Face ``tokenizers`` (shipped with the package, HF layout),
and tokenizer directories: what a checkpoint carries along."""

import shutil
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
)

from jaxformer.errors import InputError

# Files of a HF tokenizer directory, copied along with a model.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
EOS = "<|endoftext|>"
GPT2_DIR = Path(__file__).with_name("tokenizer-files")  # OpenAI's GPT-2 BPE (MIT), HF layout


class GPT2Tokenizer:
    """``encode(str) -> list[int]`` and ``decode(list[int]) -> str``, identical to GPT2TokenizerFast."""

    def __init__(self, tokenizer: Tokenizer):
        # Some published tokenizer.json files carry a truncation setting (GPT-2's: 50 tokens).
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.token_to_id(EOS)

    @classmethod
    def gpt2(cls) -> "GPT2Tokenizer":
        """OpenAI's GPT-2 tokenizer, from the copy inside the package."""
        return cls.from_dir(GPT2_DIR)

    @classmethod
    def from_dir(cls, path: str | Path) -> "GPT2Tokenizer":
        """Reads ``tokenizer.json``, or else ``vocab.json`` + ``merges.txt``, from ``path``."""
        path = Path(path)
        try:
            if (path / "tokenizer.json").is_file():
                return cls(Tokenizer.from_file(str(path / "tokenizer.json")))
            if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                bpe = models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
                tok = Tokenizer(bpe)
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tok.decoder = decoders.ByteLevel()
                tok.add_special_tokens([AddedToken(EOS, special=True)])
                return cls(tok)
        except Exception as e:  # tokenizers raises bare Exception on malformed files
            raise InputError(f"{path}: unreadable tokenizer files ({e})") from None
        raise InputError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer files present in ``src`` to ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
