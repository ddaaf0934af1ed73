"""End to end on a slice of the real data with the tiny preset: training, resume, metrics, scripts."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
import sacrebleu
from sigterm import sigterm_after_logging

from jaxformer.errors import InputError
from jaxformer.train.checkpoints import Checkpoints, restore_pytree
from jaxformer.train.loop import train
from jaxformer.translator.config import TranslatorConfig, preset
from jaxformer.translator.train import TranslatorTask
from jaxformer.translator.translate import TranslationPipeline

pytestmark = pytest.mark.slow  # the whole module: end-to-end runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fra_txt(data_root, tmp_path_factory) -> Path:
    """Every 60th line of the published fra.txt (a file a user could pass as --data)."""
    with zipfile.ZipFile(data_root / "fra-eng" / "fra-eng.zip") as z:
        lines = z.read("fra.txt").splitlines()[::60]
    path = tmp_path_factory.mktemp("data") / "fra.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def run_fields(fra_txt, **kw) -> dict:
    return dict(data=str(fra_txt), preset="tiny", log_every=4, eval_every=8, **kw)


@pytest.fixture(scope="module")
def trained(fra_txt, tmp_path_factory):
    """A run of 16 steps without interruption."""
    out = tmp_path_factory.mktemp("full")
    result = train(TranslatorTask, out, run=run_fields(fra_txt, steps=16), progress=False)
    return out, jax.device_get(result["state"])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run(fra_txt, trained, tmp_path):
    full_dir, full = trained
    train(TranslatorTask, tmp_path, run=run_fields(fra_txt, steps=6), progress=False)  # stopped off the log grid
    state = train(TranslatorTask, tmp_path, run=dict(steps=16), resume=True, progress=False)["state"]
    assert int(state.step) == 16
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), full.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), full.opt_state)
    resumed, original = records(tmp_path), records(full_dir)
    # the same log steps, and the same evaluations (the resumed run also logged and evaluated at 6)
    assert [r["step"] for r in resumed if r["step"] != 6] == [r["step"] for r in original]
    evals = lambda rs: [(r["step"], r["val_loss"], r["bleu"], r["chrf"]) for r in rs if "bleu" in r and r["step"] != 6]  # noqa: E731
    assert evals(resumed) == evals(original)


def test_outputs_metrics_and_checkpoints(trained):
    out, state = trained
    recs = records(out)
    assert [r["step"] for r in recs if "lr" in r] == [4, 8, 12, 16]
    evals = [r for r in recs if "bleu" in r]
    assert [r["step"] for r in evals] == [8, 16] and all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
    assert all(0 <= r["bleu"] <= 100 and r["val_loss"] > r["val_nll"] > 0 for r in evals)
    assert (out / "curves.png").stat().st_size > 1000
    ckpts = Checkpoints(out)
    assert ckpts.latest_step() == 16 and ckpts.best["value"] == max(r["bleu"] for r in evals)
    assert TranslatorConfig.load(out / "config.json") == preset("tiny")
    stored = json.loads((out / "run.json").read_text())
    assert stored["preset"] == "tiny" and stored["buckets"] == [8, 16, 24] and stored["steps"] == 16
    best = restore_pytree(out / "best")
    if ckpts.best["step"] == 16:
        jax.tree.map(np.testing.assert_array_equal, best, state.params)
    for name in ("valid", "test"):
        en = (out / "data" / f"{name}.en").read_text(encoding="utf-8").splitlines()
        assert len(en) == len((out / "data" / f"{name}.fr").read_text(encoding="utf-8").splitlines()) > 0


def test_translate_and_eval_scripts(trained, tmp_path):
    out, _ = trained
    lines = ["I like cheese.", "", "Où ?", " ".join(["word"] * 80), "Good morning!"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = lambda *a: subprocess.run([sys.executable, "-m", "jaxformer", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                    check=True)
    r = run("translate", "--model", str(out), "--beam", "2", "--input", str(tmp_path / "in.txt"),
            "--output", str(tmp_path / "out.txt"))
    got = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")
    assert len(got) == len(lines) + 1 and got[1] == "" and got[-1] == ""
    assert "warning: sentence 4 has" in r.stderr
    r = run("translate", "--model", str(out), "I like cheese.", "Good morning!")
    assert len(r.stdout.splitlines()) == 2

    src, ref = out / "data" / "test.en", out / "data" / "test.fr"
    r = run("eval", "translator", "--model", str(out), "--src", str(src), "--ref", str(ref),
            "--hyp", str(tmp_path / "hyp.txt"))
    hyp = (tmp_path / "hyp.txt").read_text(encoding="utf-8").splitlines()
    refs = [ref.read_text(encoding="utf-8").splitlines()]
    assert f"BLEU = {sacrebleu.corpus_bleu(hyp, refs).score:.2f}" in r.stdout
    assert f"chrF2 = {sacrebleu.corpus_chrf(hyp, refs).score:.2f}" in r.stdout


def test_refuses_to_overwrite_a_run_without_resume(fra_txt, trained):
    with pytest.raises(InputError, match="already holds a run: pass --resume"):
        train(TranslatorTask, trained[0], run=run_fields(fra_txt, steps=16), progress=False)


def losses(out: Path) -> dict[int, tuple]:
    return {r["step"]: r["loss"] if "loss" in r else r["val_loss"] for r in records(out)}


def test_mesh_data4_fsdp2_matches_one_device(trained, fra_txt, tmp_path):
    """8 virtual CPU devices, the shared sharded train step: data=4,fsdp=2 logs the same losses and
    validation losses as the 1-device run within 1e-5 over 16 steps."""
    child = textwrap.dedent(f"""
        import jax
        from jaxformer.train.loop import train
        from jaxformer.translator.train import TranslatorTask
        assert jax.device_count() == 8
        r = train(TranslatorTask, {str(tmp_path)!r}, run={run_fields(fra_txt, steps=16)!r}, progress=False,
                  mesh="data=4,fsdp=2")
        emb = r["state"].params["embed"]["embedding"]
        print("SPEC", emb.sharding.spec, len(emb.addressable_shards))
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SPEC P('fsdp', None) 8" in proc.stdout  # embedding [300, 32]: the vocabulary split over fsdp
    assert len(TranslationPipeline.load(tmp_path).translate(["Hello!"], beam_size=1)) == 1
    got, want = records(tmp_path), records(trained[0])
    assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in want]
    for g, w in zip(got, want):
        key = "loss" if "loss" in w else "val_loss"
        np.testing.assert_allclose(g[key], w[key], rtol=0, atol=1e-5)


def test_sigterm_checkpoints_exits_zero_and_resumes(fra_txt, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxformer", "train", "translator", "--data", str(fra_txt), "--out", str(out),
           "--preset", "tiny", "--steps", "100000", "--set", "log_every=1", "--set", "eval_every=100000",
           "--no-progress"]
    step, _ = sigterm_after_logging(cmd, out, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert Checkpoints(out).latest_step() == step >= 3
    resumed = subprocess.run(cmd[:cmd.index("--steps")] + ["--steps", str(step + 2), "--resume", "--no-progress"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {step}" in resumed.stderr and f"done at step {step + 2}" in resumed.stderr


def test_damaged_best_falls_back_to_the_newest_checkpoint(trained, tmp_path, recwarn):
    """A real run's best/ with a file cut short: loading warns naming it and translates with the
    newest intact checkpoint's parameters."""
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    victim = max((out / "best").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    victim.write_bytes(victim.read_bytes()[:100])
    model = TranslationPipeline.load(out)
    assert any(f"{victim} has 100 bytes" in str(w.message) for w in recwarn)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params), trained[1].params)
