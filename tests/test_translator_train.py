"""End to end on a slice of the real data with the tiny config: training, resume, metrics, scripts."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import sacrebleu

from jaxformer.checkpoint import Checkpoints, restore_pytree
from jaxformer.translator import data
from jaxformer.translator.config import TranslatorConfig, tiny
from jaxformer.translator.train import Run
from sigterm import sigterm_after_logging

CFG = tiny().replace(log_every=4, eval_every=8)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(data_root):
    return data.load_pairs(data_root / "fra-eng" / "fra-eng.zip")[::60]


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    """A run of 16 steps without interruption."""
    out = tmp_path_factory.mktemp("full")
    state, _ = Run(CFG, pairs, out, progress=False).run(steps=16)
    return out, jax.device_get(state)


def test_resume_reproduces_the_uninterrupted_run(pairs, trained, tmp_path):
    full_dir, full = trained
    Run(CFG, pairs, tmp_path, progress=False).run(steps=6)  # "interrupted" off the eval/log grid
    state, _ = Run(tiny(), pairs, tmp_path, resume=True, progress=False).run(steps=16)  # saved config wins
    assert int(state.step) == 16
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), full.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), full.opt_state)
    resumed = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    original = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    # the same log steps, and the same evaluations (the resumed run also evaluated when it stopped at 6)
    assert [r["step"] for r in resumed if r["step"] != 6] == [r["step"] for r in original]
    evals = lambda rs: [(r["step"], r["val_loss"], r["bleu"], r["chrf"]) for r in rs if "bleu" in r and r["step"] != 6]  # noqa: E731
    assert evals(resumed) == evals(original)


def test_outputs_metrics_and_checkpoints(trained):
    out, state = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "lr" in r] == [4, 8, 12, 16]
    evals = [r for r in records if "bleu" in r]
    assert [r["step"] for r in evals] == [8, 16] and all(np.isfinite(r["loss"]) for r in records)
    assert all(0 <= r["bleu"] <= 100 and r["val_loss"] > 0 for r in evals)
    assert (out / "curves.png").stat().st_size > 1000
    ckpts = Checkpoints(out)
    assert ckpts.latest_step() == 16 and ckpts.best["value"] == max(r["bleu"] for r in evals)
    assert TranslatorConfig.load(out / "config.json") == CFG
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
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                    check=True)
    r = run("scripts/translate.py", "--model", str(out), "--beam", "2", "--input", str(tmp_path / "in.txt"),
            "--output", str(tmp_path / "out.txt"))
    got = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")
    assert len(got) == len(lines) + 1 and got[1] == "" and got[-1] == ""
    assert "warning: sentence 4 has" in r.stderr
    r = run("scripts/translate.py", "--model", str(out), "I like cheese.", "Good morning!")
    assert len(r.stdout.splitlines()) == 2

    src, ref = out / "data" / "test.en", out / "data" / "test.fr"
    r = run("scripts/eval_translator.py", "--model", str(out), "--src", str(src), "--ref", str(ref),
            "--hyp", str(tmp_path / "hyp.txt"))
    hyp = (tmp_path / "hyp.txt").read_text(encoding="utf-8").splitlines()
    refs = [ref.read_text(encoding="utf-8").splitlines()]
    assert f"BLEU = {sacrebleu.corpus_bleu(hyp, refs).score:.2f}" in r.stdout
    assert f"chrF2 = {sacrebleu.corpus_chrf(hyp, refs).score:.2f}" in r.stdout


def test_refuses_to_overwrite_a_run_without_resume(pairs, trained):
    with pytest.raises(FileExistsError, match="--resume"):
        Run(CFG, pairs, trained[0], progress=False)


def losses(out: Path) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_mesh_data4_fsdp2_matches_one_device(trained, data_root, tmp_path):
    """8 virtual CPU devices, the shared sharded train step: data=4,fsdp=2 logs the same losses as
    the 1-device run within 1e-5 over 16 steps."""
    child = textwrap.dedent(f"""
        import jax
        from jaxformer.translator import data
        from jaxformer.translator.config import tiny
        from jaxformer.translator.train import Run
        assert jax.device_count() == 8
        pairs = data.load_pairs({str(data_root / "fra-eng" / "fra-eng.zip")!r})[::60]
        state, _ = Run(tiny().replace(log_every=4, eval_every=8), pairs, {str(tmp_path)!r}, progress=False,
                       mesh="data=4,fsdp=2").run(steps=16)
        emb = state.params["embed"]["embedding"]
        print("SPEC", emb.sharding.spec, len(emb.addressable_shards))
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SPEC P('fsdp', None) 8" in proc.stdout  # embedding [300, 32]: the vocabulary split over fsdp
    from jaxformer.translator.decode import TranslatorModel  # saved on 8 devices, loaded here on one
    assert len(TranslatorModel.load(tmp_path).translate(["Hello!"], beam_size=1)) == 1
    got, want = losses(tmp_path), losses(trained[0])
    assert sorted(got) == sorted(want) == [4, 8, 12, 16]
    for step in want:
        np.testing.assert_allclose(got[step][0], want[step][0], rtol=0, atol=1e-5)
        if want[step][1] is not None:
            np.testing.assert_allclose(got[step][1], want[step][1], rtol=0, atol=1e-5)


def test_sigterm_checkpoints_exits_zero_and_resumes(data_root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "scripts/train_translator.py", "--data", str(data_root / "fra-eng" / "fra-eng.zip"),
           "--out", str(out), "--preset", "tiny", "--steps", "100000", "--set", "log_every=1",
           "--set", "eval_every=100000", "--no-progress"]
    step, _ = sigterm_after_logging(cmd, out, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert Checkpoints(out).latest_step() == step >= 3
    resumed = subprocess.run(cmd[:cmd.index("--steps")] + ["--steps", str(step + 2), "--resume", "--no-progress"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {step}" in resumed.stderr and f"done at step {step + 2}" in resumed.stderr
