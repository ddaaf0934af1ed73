"""A choice's text as its tokens arrive: incremental detokenization, stop sequences, logprobs.

:class:`Detokenizer` turns token ids into text in pieces whose concatenation is the tokenizer's
decode of all of them, decoding only a short tail per token (so the work is linear in the output,
not quadratic). :class:`ChoiceText` sends that text less what may still grow into a stop sequence,
and ends it at the first stop sequence (not included).
"""

from jaxformer.serve.engine import Token

REPLACEMENT = "\ufffd"  # what decoding shows for an unfinished UTF-8 character


class Detokenizer:
    """``push(id)`` returns the text no later token can change; ``flush()`` what remains at the end.

    Only a window of tokens is decoded: those since the last point where the text ended on a whole
    character (being read), after the tokens between the two last such points (a prefix, decoded
    for context), as vLLM's and TGI's detokenizers keep ``prefix_offset`` and ``read_offset``. The
    window's text past the prefix's is new. Byte-level BPE splits a multi-byte character over
    tokens: while the new text ends in U+FFFD, only what precedes that is returned and the window
    grows; once it ends on a character, the tokens read become the prefix. A window spans a few
    tokens, and each token costs one decode of it (two when the prefix moves).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: list[int] = []  # the window: the prefix, then the tokens being read
        self._read = 0  # where the tokens being read start in the window
        self._prefix_chars = 0  # len(decode(prefix))
        self._sent = 0  # characters of the read tokens' text already returned

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids)[self._prefix_chars:]
        if text.endswith(REPLACEMENT):  # perhaps a character still incomplete: keep reading
            new = text.rstrip(REPLACEMENT)[self._sent:]
            self._sent += len(new)
            return new
        new = text[self._sent:]
        self._ids = self._ids[self._read:]
        self._read, self._sent = len(self._ids), 0
        self._prefix_chars = len(self.tokenizer.decode(self._ids))
        return new

    def flush(self) -> str:
        """The rest (an unfinished character as U+FFFD), when no token follows."""
        rest = ""
        if self._read < len(self._ids):
            rest = self.tokenizer.decode(self._ids)[self._prefix_chars + self._sent:]
        self._ids, self._read, self._prefix_chars, self._sent = [], 0, 0, 0
        return rest


class ChoiceText:
    """One choice's text; ``push`` is called on the engine's thread for every token.

    Sent text never changes: what may still grow into a stop sequence is held back, and the first
    stop sequence ends the text (``stopped``; the stop sequence is not included). ``logprobs``
    accumulates OpenAI's ``logprobs`` object when ``want_logprobs`` is set; ``text_offset`` is the
    length of the text sent before the token's own text.
    """

    def __init__(self, index: int, tokenizer, stops: tuple[str, ...] = (), want_logprobs: int | None = None,
                 end_id: int | None = None):
        """end_id: the token that ends the sequence (EOS, unless ignored): counted, never shown."""
        self.index, self.tokenizer, self.stops = index, tokenizer, stops
        self.want_logprobs, self.end_id = want_logprobs, end_id
        self.detokenizer = Detokenizer(tokenizer)
        self.pieces: list[str] = []  # the text sent, in pieces
        self.length = 0  # its length
        self.held = ""  # text decoded but held back: it may be the start of a stop sequence
        self.count = 0  # every generated token, as usage counts them
        self.stopped = False
        self.finish_reason: str | None = None
        self.logprobs = dict(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def echo(self, prompt: list[Token]) -> tuple[str, dict | None]:
        """The prompt's text and logprobs entries (its first token has none), sent before the
        completion's; stop sequences do not apply to it."""
        detokenizer, start, entries = Detokenizer(self.tokenizer), self.length, []
        for token in prompt:
            entries.append(self._entry(token, self.length))
            self._append(detokenizer.push(token.id))
        self._append(detokenizer.flush())
        return self.text[start:], self._merge(entries)

    def push(self, token: Token) -> tuple[str, dict | None]:
        """The text to send now (possibly empty) and the token's logprobs entry."""
        self.count += 1
        if token.id == self.end_id or self.stopped:
            return "", None
        offset = self.length
        return self._send(self.detokenizer.push(token.id)), self._merge([self._entry(token, offset)])

    def finish(self, reason: str) -> str:
        """The text held back at the end (a stop sequence in it still ends it); sets ``finish_reason``."""
        rest = "" if self.stopped else self._send(self.detokenizer.flush(), final=True)
        self.finish_reason = "stop" if self.stopped and reason == "length" else reason
        return rest

    def _send(self, new: str, final: bool = False) -> str:
        text, self.held = self.held + new, ""
        found = [(at + len(s), at) for s in self.stops if (at := text.find(s)) >= 0]
        if found:  # the stop sequence that is complete first (the longest of those ending there)
            self.stopped, text = True, text[:min(found)[1]]
        elif not final:  # the longest tail that starts a stop sequence
            keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                        if text.endswith(s[:k])), default=0)
            text, self.held = text[:len(text) - keep], text[len(text) - keep:]
        self._append(text)
        return text

    def _append(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            self.length += len(text)

    def _entry(self, token: Token, offset: int) -> dict | None:
        if self.want_logprobs is None:
            return None
        k, decode = self.want_logprobs, self.tokenizer.decode
        top = None if token.logprob is None else {
            decode([i]): lp for i, lp in zip(token.top_ids[:k], token.top_logprobs[:k])}
        return dict(tokens=[decode([token.id])], token_logprobs=[token.logprob], top_logprobs=[top],
                    text_offset=[offset])

    def _merge(self, entries: list[dict | None]) -> dict | None:
        """The entries as one logprobs object, also added to ``self.logprobs``."""
        if self.want_logprobs is None:
            return None
        merged = {key: [x for e in entries for x in e[key]] for key in self.logprobs}
        for key, values in merged.items():
            self.logprobs[key] += values
        return merged
