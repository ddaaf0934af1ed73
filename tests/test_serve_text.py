"""A choice's text without HTTP: the streamed pieces concatenate to the tokenizer's decode of all the
tokens (cut at the first stop sequence), multi-byte characters split over tokens included, and the
work per token is bounded (the decode calls over a 2,000-token sequence are linear in it)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxformer.gpt2.tokenizer import GPT2Tokenizer
from jaxformer.serve.engine import Token
from jaxformer.serve.text import ChoiceText, Detokenizer

TOK = GPT2Tokenizer.gpt2()
VOCAB = TOK.vocab_size
EOS = 50256
# Tokens that decode alone to U+FFFD: pieces of UTF-8 characters (emoji, CJK, accents).
PARTIAL = [i for i in range(VOCAB) if "\ufffd" in TOK.decode([i])]
TEXT = "The fox 🦊 said «日本語のテキスト» and 中文文本, 한국어 😀👍🏽 ñandú. "

token_ids = st.lists(st.one_of(st.integers(0, VOCAB - 1), st.sampled_from(PARTIAL),
                               st.sampled_from(TOK.encode(TEXT))), max_size=60)


def tokens(ids) -> list[Token]:
    return [Token(i, -1.0, [], []) for i in ids]


def stream(choice: ChoiceText, ids) -> str:
    """What a client receives: every push until the choice stops, then what finishing sends."""
    pieces = []
    for t in tokens(ids):
        pieces.append(choice.push(t)[0])
        if choice.stopped:
            break
    return "".join(pieces) + choice.finish("length")


def cut_at_stop(text: str, stops) -> str:
    """The text before the first stop sequence to appear as it grows (the longest of those that end there)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text.endswith(s, 0, end)]
        if starts:
            return text[:min(starts)]
    return text


@settings(max_examples=300, deadline=None)
@given(token_ids)
def test_pieces_concatenate_to_the_full_decode(ids):
    detokenizer, out = Detokenizer(TOK), ""
    for i, t in enumerate(ids):
        out += detokenizer.push(t)
        settled = TOK.decode(ids[:i + 1])
        assert settled.startswith(out)  # sent text never changes
        if not settled.endswith("\ufffd"):  # nothing is held back once the text ends on a character
            assert out == settled
    assert out + detokenizer.flush() == TOK.decode(ids)


@settings(max_examples=300, deadline=None)
@given(token_ids, st.data())
def test_stop_sequences_cut_at_the_first(ids, data):
    full = TOK.decode(ids)
    pick = st.integers(0, max(0, len(full) - 1))
    cut = lambda a, n: full[a:a + n] or "x"  # a stop taken from the text, so it is met
    stops = [cut(data.draw(pick), data.draw(st.integers(1, 4))) for _ in range(data.draw(st.integers(0, 2)))]
    stops += data.draw(st.lists(st.text(min_size=1, max_size=3), max_size=2))
    choice = ChoiceText(0, TOK, tuple(stops))
    assert stream(choice, ids) == cut_at_stop(full, stops) == choice.text
    assert choice.finish_reason == ("stop" if any(s in full for s in stops) else "length")


def test_a_stop_sequence_is_held_back_until_it_is_decided():
    ids = TOK.encode("Hello world, hello there")
    choice = ChoiceText(0, TOK, ("o th",))
    sent = [choice.push(t)[0] for t in tokens(ids)]
    assert "".join(sent) == "Hello world, hell" and choice.stopped and choice.finish("stop") == ""
    assert choice.finish_reason == "stop"


class CountingTokenizer:
    """The GPT-2 tokenizer, counting the calls to decode and the ids they pass."""

    def __init__(self):
        self.calls = self.ids = 0

    def decode(self, ids) -> str:
        self.calls += 1
        self.ids += len(ids)
        return TOK.decode(ids)


@pytest.mark.parametrize("kind", ["text", "random"])
def test_decoding_work_is_linear_in_the_output(kind):
    """2,000 tokens: every decode call passes a bounded tail, not the whole sequence (which would
    pass about n^2 / 2 = 2,000,000 ids in all)."""
    n = 2000
    ids = (TOK.encode(TEXT * 200)[:n] if kind == "text" else
           np.random.default_rng(0).choice(PARTIAL * 20 + list(range(VOCAB)), n).tolist())
    counting = CountingTokenizer()
    choice = ChoiceText(0, counting, ("@@never@@", "\n\n\n"))
    assert stream(choice, ids) == TOK.decode(ids)
    print(f"\n{kind}: {counting.calls} decode calls, {counting.ids} ids for {n} tokens")
    assert counting.calls <= 2 * n + 1 and counting.ids <= 8 * n


def test_logprobs_and_text_offsets():
    ids = TOK.encode("A 🦊 ran")  # " \xf0\x9f", "\xa6", "\x8a": the fox appears with the last
    choice = ChoiceText(0, TOK, (), want_logprobs=2)
    for i in ids:
        choice.push(Token(i, -0.5, [i, 0, 1], [-0.5, -1.0, -2.0]))
    choice.finish("length")
    lp = choice.logprobs
    assert lp["tokens"] == [TOK.decode([i]) for i in ids] and lp["token_logprobs"] == [-0.5] * len(ids)
    assert lp["top_logprobs"][0] == {TOK.decode([ids[0]]): -0.5, "!": -1.0}
    # each offset is the length of the text sent before the token's own text
    assert lp["text_offset"] == [0, 1, 2, 2, 3]
    assert choice.text == "A 🦊 ran"


def test_echo_puts_the_prompt_before_the_completion():
    prompt, completion = TOK.encode("Le 🦊"), TOK.encode(" rit")
    choice = ChoiceText(0, TOK, (" r",), want_logprobs=1)
    text, lp = choice.echo([Token(prompt[0], None, [], [])] + [Token(i, -1.0, [i], [-1.0]) for i in prompt[1:]])
    assert text == "Le 🦊" and lp["token_logprobs"] == [None] + [-1.0] * (len(prompt) - 1)
    assert lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
    assert stream(choice, completion) == ""  # the stop sequence applies to the completion only
    assert choice.text == "Le 🦊" and choice.logprobs["tokens"] == [TOK.decode([i]) for i in prompt + completion[:1]]


def test_the_end_token_is_counted_but_not_shown():
    """What a completion shows: the tokenizer's text of the tokens before EOS (here 'The' = 464)."""
    choice = ChoiceText(0, TOK, end_id=EOS)
    text = [choice.push(t)[0] for t in tokens([464, EOS])]
    assert "".join(text) + choice.finish("stop") == "The" == TOK.decode([464])
    assert choice.count == 2
    kept = ChoiceText(0, TOK, end_id=None)  # ignore_eos: EOS is an ordinary token
    assert stream(kept, [464, EOS]) == kept.text == TOK.decode([464, EOS])
