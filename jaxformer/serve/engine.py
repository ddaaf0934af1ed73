"""GPT-2 continuous batching: a fixed set of decoding slots advanced together by one jitted step.

A request joins when a slot is free: its prompt is prefilled (one jitted forward pass over the
prompt, padded to a power of two) into that slot's part of the KV cache, and its first token is
picked. Then every step feeds each active slot's last token at that slot's own position
(:class:`~jaxformer.nn.attention.KVCache` writes row ``r`` at ``index[r]``) and picks the next tokens
for all slots at once. A sequence leaves at EOS, a stop sequence, its token limit, the context's
end or a cancel, and its slot is taken by the next queued request at the next step. A step runs
over the smallest bucket of slots (1, 4, 16, ...) holding every active one; when sequences leave,
those above the bucket the live count needs move down into free slots (cache rows, position, last
token, key: one jitted row copy), so the step shrinks with the traffic.

Shapes never depend on the traffic: the cache holds ``window`` positions for every slot, where
``window`` is a power of two that grows (and shrinks) with the longest active sequence, so a step
attends over what is used, not over ``n_positions``; prompts are padded to powers of two. Every
shape is compiled at start-up (:func:`~jaxformer.serve.warmup.warm_up`);
:func:`~jaxformer.serve.compilations.compilations` counts the process's compilations (``/health``
shows it), which stay put while serving.

A sequence may ask for its prompt's scores (each prompt token's log-probability given the tokens
before it, and the best alternatives): one more jitted forward pass over the padded prompt, with
logits at every position, before its prefill; with ``max_tokens`` 0 it ends there.

LoRA adapters (:mod:`jaxformer.gpt2.lora`) ride along without merging: the engine holds them side
by side in one bank (:func:`~jaxformer.gpt2.lora.bank`, row 0 the base alone) and each slot has a
row, traced, so sequences of different adapters and of the base share every step and nothing
compiles per adapter.

Sampling is :func:`jaxformer.nn.decoding.sample_logits` with each slot's own temperature, top-k, top-p
and key, all traced. Sequence ``j`` of a request with seed ``s`` draws step ``i`` from
``fold_in(fold_in(key(s), j), i)``, as ``generate(..., seed=s)`` does for row ``j``, so a request
gives what ``generate`` gives for the same prompt and settings.
"""

import functools
import queue
import threading
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import InputError
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.generate import pow2_bucket
from jaxformer.gpt2.lora import LoRASpec, bank, select
from jaxformer.gpt2.model import GPT2
from jaxformer.nn.attention import KVCache
from jaxformer.nn.decoding import sample_logits
from jaxformer.serve.compilations import compilations
from jaxformer.serve.sequence import QueueFull, Sampling, Sequence, Token, notify

TOP_LOGPROBS = 5  # alternatives reported per token (OpenAI's completions allow up to 5)
ENGINE_THREAD = "jaxformer-engine"  # the decoding loop's thread (compilations there: after warm-up)
MIN_WINDOW, MIN_PROMPT = 64, 16


class Engine:
    """Continuous batching over ``slots`` sequences for one GPT-2 (see the module docstring).

    params: with unstacked layers (``config.scan_layers=False``: faster decoding on CPU).
    max_queue: sequences waiting for a slot beyond which :meth:`submit` raises :class:`QueueFull`.
    adapters: ``{name: (spec, stacked adapter)}`` LoRA adapters for this base; a sequence's
    ``adapter`` is 0 for the base alone, ``i + 1`` for the ``i``-th name of :attr:`adapters`.
    """

    def __init__(self, params, config: GPT2Config, slots: int = 8, max_queue: int = 64, warmup: bool = True,
                 adapters: dict[str, tuple[LoRASpec, dict]] | None = None):
        if slots < 1 or max_queue < 0:
            raise InputError(f"slots={slots} must be >= 1 and max_queue={max_queue} >= 0")
        # Everything the jitted functions get lives committed on one device: a committed and an
        # uncommitted array of the same shape would compile twice.
        self._device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.params = jax.device_put(params, self._device)
        self.config, self.slots, self.max_queue = config, slots, max_queue
        self.adapters = list(adapters or {})
        self._bank = jax.device_put(bank(config, list(adapters.values())), self._device) if adapters else None
        # the row counts a step is compiled for: powers of 4 below ``slots``, and ``slots``
        self.buckets = sorted({*(4**i for i in range(slots.bit_length()) if 4**i < slots), slots})
        self.eos_id = config.eos_token_id
        self.model = GPT2(config)
        compilations()  # count from here on
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seqs: list[Sequence | None] = [None] * slots
        self._pos = np.zeros(slots, np.int32)  # the position the slot's next token is written at
        self._last = np.zeros(slots, np.int32)  # the slot's last token (fed at the next step)
        self._rows = np.zeros(slots, np.int32)  # the slot's adapter (its row of the bank; 0: none)
        self._keys = np.array(jax.random.key_data(jax.random.split(jax.random.key(0), slots)))  # per sequence
        self.window = MIN_WINDOW
        self._cache = self._zeros(self.window)
        self._thread = threading.Thread(target=self._run, name=ENGINE_THREAD, daemon=True)
        self.steps = 0
        self.step_rows = 0  # rows of the latest step (a bucket)
        self._ending = threading.Event()
        if warmup:
            from jaxformer.serve.warmup import warm_up
            warm_up(self)
        self._thread.start()

    # --- public -----------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._seqs)

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, seqs: list[Sequence]) -> None:
        """Queues the sequences of one request (all or none: QueueFull when they do not fit)."""
        for s in seqs:
            if not 0 <= s.adapter <= len(self.adapters):
                raise InputError(f"adapter {s.adapter}: this engine holds {len(self.adapters)} LoRA adapters")
            if len(s.prompt) + s.sampling.max_tokens > self.config.n_positions:
                raise InputError(f"prompt of {len(s.prompt)} tokens + max_tokens={s.sampling.max_tokens} exceeds the "
                                 f"context of {self.config.n_positions} tokens")
        if len(seqs) > self.slots + self.max_queue:
            raise InputError(f"{len(seqs)} sequences in one request: this server holds at most {self.slots} running "
                             f"and {self.max_queue} waiting")
        with self._lock:  # free slots take queued sequences first; max_queue more may wait
            if self._queued + len(seqs) > self.max_queue + max(0, self.slots - self.active):
                raise QueueFull(f"{self._queued} sequences are waiting for one of {self.slots} slots")
            self._queued += len(seqs)
        for s in seqs:
            self._queue.put(s)
        self._wake.set()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Ends the sequences (a client that went away): their slots free at the next step."""
        for s in seqs:
            s.cancelled = True
        self._wake.set()

    def shutdown(self) -> None:
        """Ends every running and waiting sequence (``finish("shutdown")``) at the next step, and
        every sequence submitted from now on."""
        self._ending.set()
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # --- compiled functions --------------------------------------------------------------------------

    def _zeros(self, window: int) -> KVCache:
        c = self.config
        return jax.device_put(KVCache.zeros(self.slots, window, c.n_head, c.head_dim, c.compute_dtype, c.n_layer),
                              self._device)

    def _lora(self, bank, rows):
        return None if bank is None else select(bank, rows, self.config)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
    def _step(self, params, bank, cache, tokens, pos, rows, keys, counts, temperature, top_k, top_p):
        """One token for each of the first R slots (R = ``len(tokens)``, a bucket: the cache's other
        slots are left alone): tokens, pos int32[R]; bank: the adapters (or None) and rows int32[R]
        each slot's; keys uint32[R, 2] (each sequence's key data) and
        counts [R] (its tokens so far: the step's key is ``fold_in(key, count)``); the sampling
        settings [R]. Returns (next int32[R], logprob [R], top ids [R, k], top logprobs [R, k],
        cache). Idle slots among them compute too (their results are ignored)."""
        key_valid = jnp.arange(cache.k.shape[-2])[None, :] <= pos[:, None]
        logits, cache = self.model.apply({"params": params}, tokens[:, None], positions=pos[:, None],
                                         key_valid=key_valid, cache=cache, index=pos, last_only=True,
                                         lora=self._lora(bank, rows))
        return (*self._pick(logits[:, 0], keys, counts, temperature, top_k, top_p), cache)

    @staticmethod
    def _pick(logits, keys, counts, temperature, top_k, top_p):
        """Each row's token (temperature 0: greedy; idle slots are), its log-probability and the
        best alternatives."""
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), counts)
        tok = sample_logits(logits, keys, temperature, top_k, top_p)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
        return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0], top_ids, top_lp

    @functools.partial(jax.jit, static_argnums=0)
    def _prefill(self, params, bank, tokens, length, row, seed, index, temperature, top_k, top_p):
        """One prompt, right-padded: tokens int32[1, P], length int32[], row int32[] its adapter; the
        sequence's key is
        ``fold_in(key(seed), index)``. Returns (the first token's pick as in :meth:`_step`, the key's
        data uint32[2], k, v [L, 1, H, P, d])."""
        p = tokens.shape[1]
        cache = KVCache.zeros(1, p, self.config.n_head, self.config.head_dim, self.config.compute_dtype,
                              self.config.n_layer)
        logits, cache = self.model.apply({"params": params}, tokens, cache=cache, index=0, at=(length - 1)[None],
                                         lora=self._lora(bank, row[None]))
        key = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), index))
        pick = self._pick(logits[:, 0], key[None], jnp.zeros(1, jnp.uint32), temperature, top_k, top_p)
        return (*pick, key, cache.k, cache.v)

    @functools.partial(jax.jit, static_argnums=0)
    def _score(self, params, bank, tokens, row):
        """A right-padded prompt's scores: tokens int32[1, P], row int32[] its adapter. Returns each next token's
        log-probability float32[P - 1] and the best alternatives at each position (ids, log-probs
        [P - 1, k]); entries past the prompt are padding."""
        positions = jnp.minimum(jnp.arange(tokens.shape[1]), self.config.n_positions - 1)[None]
        logits, _ = self.model.apply({"params": params}, tokens, positions=positions, lora=self._lora(bank, row[None]))
        logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
        top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
        return jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0], top_ids, top_lp

    @staticmethod
    @functools.partial(jax.jit, donate_argnums=0)
    def _insert(cache: KVCache, k, v, slot) -> KVCache:
        """Writes a prefilled prompt's keys/values into ``slot`` at positions 0 ..."""
        start = (0, slot, 0, 0, 0)
        return KVCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                       jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start))

    @staticmethod
    @functools.partial(jax.jit, donate_argnums=0)
    def _move(cache: KVCache, src, dst) -> KVCache:
        """The cache with slot ``dst``'s keys and values replaced by slot ``src``'s."""
        def move(x):
            row = jax.lax.dynamic_index_in_dim(x, src, axis=1)
            return jax.lax.dynamic_update_index_in_dim(x, row, dst, axis=1)
        return KVCache(move(cache.k), move(cache.v))

    @staticmethod
    @functools.partial(jax.jit, static_argnums=1)
    def _resize(cache: KVCache, window: int) -> KVCache:
        """The cache with ``window`` positions: padded with zeros, or cut (nothing active beyond)."""
        def fit(x):
            if window <= x.shape[-2]:
                return x[..., :window, :]
            return jnp.pad(x, [(0, 0)] * 3 + [(0, window - x.shape[-2]), (0, 0)])
        return KVCache(fit(cache.k), fit(cache.v))

    def _settings(self, seqs) -> tuple:
        """The sampling settings of ``seqs`` (None: an idle slot) as arrays for the jitted functions."""
        s = [seq.sampling if seq else Sampling(1, temperature=0) for seq in seqs]
        return np.float32([x.temperature for x in s]), np.int32([x.top_k for x in s]), np.float32([x.top_p for x in s])

    # --- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._ending.is_set():
                    self._end_all("shutdown")
                self._admit()
                if not self.active:
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                self._fit_window()
                self._compact()
                self._advance()
            except Exception:  # a bug: end what is running (its clients hear "error"), keep serving
                traceback.print_exc()
                for slot, seq in enumerate(self._seqs):
                    if seq is not None:
                        self._end(slot, "error")
                self._cache = self._zeros(self.window)  # a failed step may have consumed (donated) it

    def _end_all(self, reason: str) -> None:
        """Ends the running sequences and the waiting ones with ``reason``."""
        for slot, seq in enumerate(self._seqs):
            if seq is not None:
                self._end(slot, reason)
        while True:
            try:
                seq = self._queue.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                self._queued -= 1
            notify(seq.finish, reason)

    def _admit(self) -> None:
        """Prefills queued sequences into free slots, one at a time."""
        for slot in range(self.slots):
            while self._seqs[slot] is None:  # a sequence that generates nothing leaves it free
                try:
                    seq = self._queue.get_nowait()
                except queue.Empty:
                    return
                try:
                    if seq.cancelled:
                        notify(seq.finish, "cancelled")
                    else:
                        self._start(slot, seq)
                except Exception:
                    notify(seq.finish, "error")
                    raise
                finally:  # counted as queued until it holds its slot
                    with self._lock:
                        self._queued -= 1

    def _start(self, slot: int, seq: Sequence) -> None:
        """Scores the prompt (when asked), prefills it into ``slot`` and delivers the first token."""
        n = len(seq.prompt)
        p = pow2_bucket(n, MIN_PROMPT)
        tokens = np.zeros((1, p), np.int32)
        tokens[0, :n] = seq.prompt
        if seq.scored is not None:
            lp, top_ids, top_lp = jax.device_get(self._score(self.params, self._bank, tokens, np.int32(seq.adapter)))
            prompt = [Token(seq.prompt[0], None, [], [])] + [
                Token(t, float(lp[i]), top_ids[i].tolist(), top_lp[i].tolist()) for i, t in enumerate(seq.prompt[1:])]
            if not notify(seq.scored, prompt):
                return notify(seq.finish, "error")
        if seq.sampling.max_tokens == 0:
            return notify(seq.finish, "length")
        if p > self.window or n + 1 > self.window:
            self._set_window(pow2_bucket(max(p, n + 1), MIN_WINDOW))
        tok, lp, top_ids, top_lp, key, k, v = self._prefill(
            self.params, self._bank, tokens, np.int32(n), np.int32(seq.adapter), np.int32(seq.sampling.seed),
            np.int32(seq.index), *self._settings([seq]))
        self._keys[slot] = np.asarray(key)
        self._rows[slot] = seq.adapter
        self._cache = self._insert(self._cache, k, v, np.int32(slot))
        seq.slot = slot
        self._seqs[slot] = seq
        self._pos[slot] = n
        tok, lp, top_ids, top_lp = (x[0] for x in jax.device_get((tok, lp, top_ids, top_lp)))  # one transfer
        self._deliver(slot, int(tok), float(lp), top_ids, top_lp)

    def _compact(self) -> None:
        """Moves the sequences above the smallest bucket that could hold them all into its free
        slots (cache rows, position, last token, key), so a step's rows follow the live count."""
        live = [i for i, s in enumerate(self._seqs) if s is not None]
        need = min(b for b in self.buckets if b >= len(live))
        free = [i for i in range(need) if self._seqs[i] is None]
        for src, dst in zip([i for i in live if i >= need], free):
            self._cache = self._move(self._cache, np.int32(src), np.int32(dst))
            for a in (self._pos, self._last, self._keys, self._rows):
                a[dst] = a[src]
            seq = self._seqs[dst] = self._seqs[src]
            self._seqs[src], seq.slot = None, dst

    def _advance(self) -> None:
        """One step over the smallest bucket of slots that holds every active one (new sequences
        take the lowest free slot, and :meth:`_compact` moves the others down)."""
        used = max(i for i, s in enumerate(self._seqs) if s is not None) + 1
        r = self.step_rows = min(b for b in self.buckets if b >= used)
        seqs = self._seqs[:r]
        counts = np.asarray([seq.generated if seq else 0 for seq in seqs], np.uint32)
        tok, lp, top_ids, top_lp, self._cache = self._step(self.params, self._bank, self._cache, self._last[:r],
                                                           self._pos[:r], self._rows[:r], self._keys[:r], counts,
                                                           *self._settings(seqs))
        self.steps += 1
        tok, lp, top_ids, top_lp = jax.device_get((tok, lp, top_ids, top_lp))  # one transfer
        for slot, seq in enumerate(seqs):
            if seq is not None:
                self._pos[slot] += 1
                self._deliver(slot, int(tok[slot]), float(lp[slot]), top_ids[slot], top_lp[slot])

    def _deliver(self, slot: int, token: int, logprob: float, top_ids, top_lp) -> None:
        """Hands a decided token to its sequence, and ends the sequence when it is done."""
        seq = self._seqs[slot]
        if seq.cancelled:
            return self._end(slot, "cancelled")
        seq.generated += 1
        self._last[slot] = token
        if not notify(seq.emit, Token(token, logprob, top_ids.tolist(), top_lp.tolist())):
            self._end(slot, "error")
        elif token == self.eos_id and not seq.sampling.ignore_eos:
            self._end(slot, "stop")
        elif seq.should_stop():
            self._end(slot, "stop")
        elif seq.generated >= seq.sampling.max_tokens or self._pos[slot] >= self.config.n_positions:
            self._end(slot, "length")

    def _end(self, slot: int, reason: str) -> None:
        seq, self._seqs[slot] = self._seqs[slot], None
        notify(seq.finish, reason)

    def _fit_window(self) -> None:
        """Grows the window before a sequence would write past it; shrinks it when the longest
        active sequence fits in a quarter of it."""
        longest = max(int(self._pos[i]) for i, s in enumerate(self._seqs) if s is not None) + 1
        if longest > self.window:
            self._set_window(pow2_bucket(longest, MIN_WINDOW))
        elif self.window > MIN_WINDOW and 4 * longest <= self.window:
            self._set_window(max(MIN_WINDOW, self.window // 2))

    def _set_window(self, window: int) -> None:
        if window != self.window:
            self._cache = self._resize(self._cache, window)
            self.window = window
