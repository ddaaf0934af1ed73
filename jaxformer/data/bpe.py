"""The one BPE trainer: byte-level BPE learnt from a corpus (Hugging Face ``tokenizers``), used by
both models for vocabularies learnt from their data (GPT-2's ``bpe:VOCAB``, the translator's)."""

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers


def train_bpe(texts, vocab_size: int, special_tokens: list[str], *, add_prefix_space: bool = False,
              nfc: bool = False) -> Tokenizer:
    """A byte-level BPE learnt from ``texts`` (an iterable of strings); ``special_tokens`` take ids
    0, 1, ... in order. Every byte is in the base alphabet, so any text encodes, also characters
    never seen in training, and decoding gives it back. ``nfc``: NFC-normalise first."""
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok
