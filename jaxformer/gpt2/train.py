"""GPT-2 pretraining and fine-tuning: sharded, mixed-precision, preemption-safe.

Output directory ``OUT``::

    run.json  config.json  tokenizer.json      run settings (TrainConfig), model config, tokenizer
    data/{train,val}.npy                       the token streams (written once, reused by --resume)
    checkpoints/<step>/                        train states (Orbax, atomic; the last ``keep``)
    metrics.jsonl  loss.png                    one JSON object per logged step / evaluation

The train step is one ``jax.jit`` with in/out shardings over a ``data`` x ``fsdp`` mesh
(:mod:`jaxformer.sharding`); parameters are float32 master weights, the forward/backward runs in
``config.dtype`` (bf16 on accelerators), logits, softmax and loss in float32.
"""

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxformer import sharding as sh
from jaxformer import training
from jaxformer.checkpoint import Checkpoints
from jaxformer.distributed import barrier, print0
from jaxformer.gpt2 import data as gdata
from jaxformer.gpt2.config import GPT2Config, preset
from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.model import GPT2, init_params
from jaxformer.losses import cross_entropy
from jaxformer.metrics import MetricsLog, plot_curves
from jaxformer.resumable import StopRequested, any_process
from jaxformer.schedules import warmup_cosine
from jaxformer.tokenizer import GPT2Tokenizer
from jaxformer.training import NonFiniteLoss, TrainState


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; stored in ``OUT/run.json`` and reused by ``--resume``."""

    data: tuple[str, ...]
    text_field: str = "text"  # JSONL field holding the text
    tokenizer: str = "gpt2"  # gpt2 | a tokenizer directory | bpe:VOCAB | word:VOCAB (trained on the data)
    val_fraction: float = 0.1
    preset: str = "tiny"
    init: str | None = None  # fine-tune from a jaxformer checkpoint or HF directory (overrides preset)
    dtype: str = "float32"  # compute dtype; parameters stay float32
    seq_len: int = 128
    batch_size: int = 16  # global sequences per micro-batch
    grad_accum: int = 1  # micro-batches per update
    steps: int = 1000
    schedule_steps: int | None = None  # cosine horizon (default: steps)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    keep: int = 2  # checkpoints kept
    sample_tokens: int = 64  # tokens generated per evaluation (0: none)
    prompt: str | None = None  # sample prompt (default: the first 8 validation tokens)

    def __post_init__(self):
        object.__setattr__(self, "data", tuple(self.data))
        if self.schedule_steps is None:
            object.__setattr__(self, "schedule_steps", self.steps)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        return cls(**json.loads(path.read_text()))


# --- FLOPs and MFU -----------------------------------------------------------------------------

def flops_per_token(config: GPT2Config, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): ``6 N + 12 L D T``.

    N counts the parameters that take part in matmuls: all but the position embeddings (the tied
    token embedding is counted once, as the output projection). ``6 N``: 2 forward + 4 backward
    FLOPs per weight; ``12 L D T``: attention scores and values (QK^T and AV, no causal saving).
    """
    n = config.num_params() - config.n_positions * config.n_embd
    return 6.0 * n + 12.0 * config.n_layer * config.n_embd * seq_len


# Dense bf16 peak FLOP/s per chip, matched by substring of ``device.device_kind`` (first match).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("L40S", 362e12), ("A10", 125e12), ("L4", 121e12), ("V100", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def measure_matmul_flops(device, dtype, n: int = 1024, reps: int = 5) -> float:
    """Best FLOP/s of an ``n x n`` matmul on ``device`` (the CPU's peak, which no table knows)."""
    x = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device for ``dtype`` compute, where it came from). Accelerators: the
    table (float32 counts half the bf16 rate: TF32 on GPUs); CPUs: measured."""
    if device.platform == "cpu":
        return measure_matmul_flops(device, jnp.dtype(dtype)), "measured matmul"
    for name, flops in PEAK_BF16_FLOPS:
        if name in device.device_kind:
            return (flops if dtype != "float32" else flops / 2), f"table ({name})"
    return math.nan, f"unknown device kind {device.device_kind!r}"


# --- optimizer, loss, steps --------------------------------------------------------------------

def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping, then AdamW (decay on kernels only) with warm-up + cosine decay;
    returns (optimizer, schedule)."""
    schedule = warmup_cosine(cfg.lr, cfg.warmup, cfg.schedule_steps, cfg.min_lr_ratio)
    return training.make_optimizer(schedule, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm,
                                   b1=cfg.b1, b2=cfg.b2, eps=1e-8), schedule


def make_loss_fn(config: GPT2Config, deterministic: bool = False) -> training.LossFn:
    """``loss_fn(params, windows, key) -> (summed next-token cross-entropy, (tokens, {}))`` for
    windows int32[b, T + 1] (float32 loss whatever the compute dtype; dropout unless deterministic)."""
    model = GPT2(config, deterministic=deterministic)

    def loss_fn(params, windows, key):
        logits, _ = model.apply({"params": params}, windows[:, :-1],
                                rngs=None if key is None else {"dropout": key})
        total, _, n = cross_entropy(logits, windows[:, 1:], jnp.ones(windows[:, 1:].shape, bool))
        return total, (n, {})

    return loss_fn


# --- the run -----------------------------------------------------------------------------------

def prepare(cfg: TrainConfig, out: Path, fresh: bool):
    """(model config, tokenizer, train tokens, val tokens, ``cfg.init``'s params or None).

    A fresh run (``fresh``: no checkpoint yet) loads ``cfg.init`` and writes config.json,
    tokenizer.json and data/*.npy (process 0; ``out`` must be shared by all processes, as the
    checkpoints are); a resumed run reads them back.
    """
    pretrained = init_tok = None
    if fresh and cfg.init is not None:
        from jaxformer.gpt2.pretrained import load_pretrained
        mcfg, pretrained, init_tok = load_pretrained(cfg.init, dtype=cfg.dtype, param_dtype="float32",
                                                     scan_layers=True)
    if fresh and jax.process_index() == 0:
        texts = gdata.read_texts(cfg.data, cfg.text_field)
        tok = init_tok or gdata.load_tokenizer(cfg.tokenizer, texts)
        if cfg.init is None:
            base = preset(cfg.preset)
            mcfg = base.replace(vocab_size=tok.vocab_size, n_positions=max(base.n_positions, cfg.seq_len),
                                bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, dtype=cfg.dtype)
        elif tok.vocab_size > mcfg.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens, the --init model {mcfg.vocab_size}")
        train_tokens, val_tokens = gdata.split(gdata.tokenize(tok, texts), cfg.val_fraction)
        (out / "data").mkdir(parents=True, exist_ok=True)
        np.save(out / "data" / "train.npy", train_tokens)
        np.save(out / "data" / "val.npy", val_tokens)
        tok.tokenizer.save(str(out / "tokenizer.json"))
        mcfg.save(out / "config.json")
    barrier("jaxformer-gpt2-data")
    mcfg = GPT2Config.load(out / "config.json")
    tok = GPT2Tokenizer.from_dir(out)
    train_tokens, val_tokens = (np.load(out / "data" / f"{n}.npy", mmap_mode="r") for n in ("train", "val"))
    if cfg.seq_len > mcfg.n_positions:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's n_positions={mcfg.n_positions}")
    return mcfg, tok, train_tokens, val_tokens, pretrained


def train(cfg: TrainConfig, out: str | Path, *, mesh: str | None = None, resume: bool = False,
          metrics_path: str | Path | None = None, export_hf: str | Path | None = None,
          progress: bool = True) -> dict:
    """Trains until ``cfg.steps``, a SIGTERM/SIGINT (checkpoint, then return) or a non-finite loss
    (raises :class:`NonFiniteLoss`; the last checkpoint is the last good one).

    Returns ``{"step", "stopped_by" (signal name or None), "records" (this session's metrics),
    "state"}``.
    """
    t0 = time.time()
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(out, cfg.keep)
    resuming = ckpts.latest_step() is not None
    if resuming and not resume:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume, or choose a new --out")
    if jax.process_index() == 0:
        cfg.save(out / "run.json")
    mcfg, tok, train_tokens, val_tokens, pretrained = prepare(cfg, out, fresh=not resuming)
    train_w = gdata.Windows(train_tokens, cfg.seq_len, "training split")
    val_w = gdata.Windows(val_tokens, cfg.seq_len, "validation split")
    val_batches = val_w.eval_batches(cfg.batch_size, cfg.eval_batches)

    device_mesh = sh.make_mesh(mesh)
    if cfg.batch_size % sh.batch_size_divisor(device_mesh):
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {sh.batch_size_divisor(device_mesh)} "
                         f"batch shards of mesh {dict(device_mesh.shape)}")
    optimizer, schedule = make_optimizer(cfg)

    def create(key, params=None):
        init_key, run_key = jax.random.split(key)
        params = init_params(mcfg, init_key) if params is None else params
        return TrainState.create(params, optimizer, run_key)

    state, state_sh = training.init_state(create, jax.random.PRNGKey(cfg.seed), device_mesh, pretrained, ckpts)
    step = first_step = int(state.step)

    accum = cfg.grad_accum > 1  # micro-batches get a leading axis
    batch_sh = sh.batch_sharding(device_mesh, batch_dim=int(accum), ndim=2 + accum)
    eval_sh = sh.batch_sharding(device_mesh, batch_dim=0, ndim=2)
    train_step = training.make_train_step(make_loss_fn(mcfg), optimizer, grad_accum=cfg.grad_accum,
                                          state_shardings=state_sh, batch_sharding=batch_sh)
    eval_step = training.make_eval_step(make_loss_fn(mcfg, deterministic=True), state_sh.params, eval_sh)

    n_dev = device_mesh.devices.size
    peak, peak_src = peak_flops(device_mesh.devices.flat[0], mcfg.dtype)
    fpt = flops_per_token(mcfg, cfg.seq_len)
    tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len
    prompt = tok.encode(cfg.prompt) if cfg.prompt else val_tokens[:8].tolist()
    metrics = MetricsLog(metrics_path or out / "metrics.jsonl", step if resuming else None)
    print0(f"{'resuming at' if resuming else 'starting at'} step {step} of {cfg.steps}; "
           f"{mcfg.num_params():,} params, {mcfg.dtype} compute; mesh {dict(device_mesh.shape)} on "
           f"{n_dev} {device_mesh.devices.flat[0].device_kind} device(s), {jax.process_count()} process(es); "
           f"{len(train_w):,} train / {len(val_w):,} val windows of {cfg.seq_len}; peak {peak:.3g} FLOP/s "
           f"per device ({peak_src}), {fpt:.3g} FLOPs/token")

    def checkpoint_note() -> str:
        last = ckpts.latest_step()
        if last is None:
            return "No checkpoint was written yet."
        return f"The last good checkpoint is step {last} in {ckpts.states} (continue with --resume)."

    def evaluate() -> dict:
        sums = jax.device_get([eval_step(state.params, sh.put_batch(b, eval_sh)) for b in val_batches])
        loss = sum(float(t) for t, _, _ in sums) / sum(float(n) for _, n, _ in sums)
        record = dict(step=step, val_loss=loss, val_ppl=math.exp(min(loss, 700.0)))
        if cfg.sample_tokens > 0:
            new = generate(sh.gathered(state.params), mcfg, [prompt], temperature=0.8, top_p=0.95, seed=step,
                           max_new_tokens=min(cfg.sample_tokens, mcfg.n_positions - len(prompt)))[0]
            record["sample"] = tok.decode(prompt + new)
        return record

    pending, t_last, tokens_since, last_loss = [], None, 0, math.nan
    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    stopped_by = None
    with StopRequested() as stop:
        while step < cfg.steps:
            windows = train_w.train_batch(cfg.seed, step, cfg.grad_accum, cfg.batch_size)
            state, m = train_step(state, sh.put_batch(windows if accum else windows[0], batch_sh, int(accum)))
            step += 1
            bar.update(1)
            pending.append((step, m))
            if t_last is None:  # first step of this session: compilation is not throughput
                jax.block_until_ready(m)
                t_last = time.perf_counter()
            else:
                tokens_since += tokens_per_step
            at_log = step % cfg.log_every == 0 or step == cfg.steps
            at_eval = step % cfg.eval_every == 0 or step == cfg.steps
            at_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps
            # One process: poll the flag every step. Several: agree at log steps (a collective).
            stopping = any_process(bool(stop)) if (jax.process_count() == 1 or at_log) else False
            if not (at_log or at_eval or at_ckpt or stopping):
                continue
            # Flush: every pending loss is checked before anything is logged or saved.
            fetched = jax.device_get([m for _, m in pending])
            try:
                training.check_finite([(s, fm["loss"]) for (s, _), fm in zip(pending, fetched)], checkpoint_note)
            except NonFiniteLoss:
                bar.close()
                raise
            # Throughput over the steps since the last flush (None right after compilation).
            tok_s = tokens_since / (time.perf_counter() - t_last) if tokens_since else None
            mfu = tok_s * fpt / (peak * n_dev) if tok_s and math.isfinite(peak) else None
            last_loss = float(np.mean([fm["loss"] for fm in fetched]))
            metrics.log(dict(step=step, loss=last_loss, grad_norm=float(fetched[-1]["grad_norm"]),
                             lr=float(schedule(step - 1)), tokens_per_s=tok_s and round(tok_s, 1),
                             mfu=mfu and round(mfu, 5), elapsed_s=round(time.time() - t0, 1)))
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s or 0:.0f}", mfu=f"{mfu or 0:.1%}")
            pending = []
            if at_eval:
                record = evaluate()
                metrics.log(record)
                if jax.process_index() == 0:
                    bar.write(f"step {step}: val_loss {record['val_loss']:.4f} ppl {record['val_ppl']:.2f}"
                              + (f"\n{record['sample']!r}" if "sample" in record else ""), file=sys.stderr)
            if at_ckpt or stopping:
                ckpts.save(step, state)
            if jax.process_index() == 0 and (at_eval or stopping or step == cfg.steps):
                plot(metrics.records, out / "loss.png")
            t_last, tokens_since = time.perf_counter(), 0
            if stopping:
                stopped_by = stop.signal or "signal on another process"
                break
    bar.close()
    if stopped_by:
        print0(f"{stopped_by}: stopped after step {step} and saved a checkpoint in {ckpts.states}. "
               f"Continue with the same command plus --resume (e.g. --out {out} --resume).")
    else:
        if export_hf:
            from jaxformer.gpt2.hf import save_hf
            params = jax.device_get(sh.gathered(state.params))
            if jax.process_index() == 0:
                save_hf(export_hf, mcfg, params, tokenizer_dir=out)
                print0(f"exported Hugging Face model to {export_hf}")
        print0(f"done at step {step} ({time.time() - t0:.0f} s); final train loss {last_loss:.4f}")
    ckpts.close()
    return dict(step=step, stopped_by=stopped_by, state=state,
                records=[r for r in metrics.records if r["step"] > first_step])


def plot(records: list[dict], path: Path) -> None:
    """PNG of the training and validation loss against the step."""
    plot_curves(path, [dict(title="GPT-2 training loss", ylabel="cross-entropy per token",
                            series=[("train", "loss", "-"), ("validation", "val_loss", "o-")])], records)
