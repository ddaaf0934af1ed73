"""The command-line contract: flags derived from the configs, one resume rule, and every script's bad
inputs answered with ``error: ...`` naming the problem, a non-zero exit and no traceback.

Scripts run in-process through their ``main(argv)`` (fast); each bad input fails before any model
compiles.
"""

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import shutil
import socket
import sys

import numpy as np
import pytest

from jaxformer.commands import cli
from jaxformer.commands import COMMANDS
from jaxformer.commands import main as jaxformer_main
from jaxformer.config import resume_changes
from jaxformer.errors import InputError
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.train import GPT2Task, GPT2RunConfig
from jaxformer.translator.config import TranslatorConfig
from jaxformer.translator.train import TranslatorTask, TranslatorRunConfig


def call(capsys, verb: str, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``jaxformer VERB ARGV...`` (or of ``scripts/bench_*.py``'s
    main(argv)), in this process."""
    capsys.readouterr()
    try:
        if verb.startswith("bench_"):
            status = bench_script(verb).main([str(a) for a in argv])
        else:
            status = jaxformer_main([*verb.split(), *map(str, argv)])
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def bench_script(name: str):
    """``scripts/<name>.py`` as a module (the benchmarks are programs of the source tree, not the package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- flags from configs ------------------------------------------------------------------------------

def trainer_parser(task_cls) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append")
    cli.add_config_flags(ap, task_cls.run_config)
    cli.add_config_flags(ap, task_cls.model_config, "model.")
    return ap


@pytest.mark.parametrize("task_cls, dropout", [(GPT2Task, "resid_pdrop"), (TranslatorTask, "dropout")])
def test_every_field_is_a_typed_flag_and_set_works_for_both_trainers(task_cls, dropout):
    ap = trainer_parser(task_cls)
    flags = {a.option_strings[0]: a for a in ap._actions if a.option_strings}
    for cls, prefix in ((task_cls.run_config, ""), (task_cls.model_config, "model.")):
        for f in dataclasses.fields(cls):
            action = flags[f"--{prefix}{f.name.replace('_', '-')}"]
            assert f.metadata["help"] and f.metadata["help"] in action.help
    args = ap.parse_args(["--set", "schedule=cosine", "--lr", "3e-4", "--set", f"model.{dropout}=0.25", "--seed", "7"])
    run, model = cli.overrides(args, task_cls.run_config, task_cls.model_config)
    assert run == dict(schedule="cosine", lr=3e-4, seed=7) and model == {dropout: 0.25}
    assert task_cls.run_config(**{**run, "steps": 1}).schedule == "cosine"


def test_flag_values_are_parsed_by_the_field_type():
    args = trainer_parser(GPT2Task).parse_args(
        ["--data", "a.txt", "b.jsonl", "--prompt", "none", "--model.scan-layers", "false", "--model.n-inner", "96",
         "--set", "n_layer=4", "--set", "export_hf=out/hf"])
    run, model = cli.overrides(args, GPT2RunConfig, GPT2Config)
    assert run == dict(data=("a.txt", "b.jsonl"), prompt=None, export_hf="out/hf")
    assert model == dict(scan_layers=False, n_inner=96, n_layer=4)  # a bare architecture name works too
    args = trainer_parser(TranslatorTask).parse_args(["--buckets", "8,16", "24", "--set", "buckets=8,12,24"])
    assert cli.overrides(args, TranslatorRunConfig, TranslatorConfig)[0] == dict(buckets=(8, 12, 24))


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "abc"], "argument --batch-size: 'abc': expected an integer"),
    (["--model.tie-word-embeddings", "maybe"], "expected true or false"),
    (["--lr", "fast"], "'fast': expected a number"),
])
def test_unparsable_flag_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        trainer_parser(GPT2Task).parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_set_names_unknown_settings_and_suggests():
    args = argparse.Namespace(set=["schedul=cosine"])
    with pytest.raises(InputError, match="no setting 'schedul'; did you mean schedule"):
        cli.overrides(args, GPT2RunConfig, GPT2Config)


def test_values_are_checked_by_the_config():
    with pytest.raises(InputError, match="batch_size=-1: must be >= 1"):
        GPT2RunConfig(batch_size=-1)
    with pytest.raises(InputError, match="schedule='cosin': choose from cosine, noam, constant"):
        TranslatorRunConfig(schedule="cosin")
    with pytest.raises(InputError, match="d_model=30 is not divisible by n_heads=4"):
        TranslatorConfig(d_model=30)
    with pytest.raises(InputError, match="val_fraction=1.5: must be < 1"):
        GPT2RunConfig(val_fraction=1.5)
    with pytest.raises(InputError, match=r"x.json: unknown GPT2Config keys \['bogus'\]"):
        GPT2Config.from_dict({"bogus": 1}, "x.json")


def test_one_resume_rule_for_both_trainers():
    for cfg in (GPT2RunConfig(steps=100), TranslatorRunConfig(steps=100)):
        assert resume_changes(cfg, dict(steps=300, log_every=7, keep=3)) == cfg.replace(steps=300, log_every=7, keep=3)
        assert resume_changes(cfg, dict(lr=cfg.lr)) == cfg  # the same value is no change
        with pytest.raises(InputError, match=r"--resume cannot change lr=0.5 .*may change only .*steps"):
            resume_changes(cfg, dict(lr=0.5, steps=200))
        with pytest.raises(InputError, match="keep=0: must be >= 1"):
            resume_changes(cfg, dict(keep=0))


# --- every script's bad inputs -------------------------------------------------------------------------

def damaged_copy(src, dst, what: str):
    shutil.copytree(src, dst)
    victim = max((dst / what).rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return dst, victim


def bad_inputs(tmp, translator_dir, gpt2_dir):
    """(script, argv, expected exit status, expected message) for bad inputs of every script."""
    (tmp / "corpus.txt").write_text("To be, or not to be: that is the question. " * 40)
    (tmp / "data.csv").write_text("a,b\n")
    (tmp / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp / "nofield.jsonl").write_text('{"body": "x"}\n')
    (tmp / "bad.zip").write_bytes(b"PK\x03\x04 not a zip")
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("taken")
    (tmp / "taken.txt").write_text("taken")
    (tmp / "two.txt").write_text("a\nb\n")
    (tmp / "one.txt").write_text("a\n")
    (tmp / "hf-bad-json").mkdir()
    (tmp / "hf-bad-json" / "config.json").write_text('{"model_type": "gpt2", ')
    mismatch = tmp / "mismatch"
    shutil.copytree(gpt2_dir, mismatch)
    cfg = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**cfg, "n_layer": cfg["n_layer"] + 1}))
    damaged, victim = damaged_copy(gpt2_dir, tmp / "damaged", "params")
    corpus = ["--data", tmp / "corpus.txt", "--tokenizer", "bpe:300", "--out"]
    tr = ["--data", tmp / "bad.zip", "--preset", "tiny", "--steps", "2", "--out", tmp / "tr"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        # train_gpt2.py
        ("train gpt2", [*corpus, tmp / "a", "--batch-size", "-1"], 2, "error: batch_size=-1: must be >= 1"),
        ("train gpt2", [*corpus, tmp / "a", "--lr", "0"], 2, "error: lr=0.0: must be > 0"),
        ("train gpt2", ["--data", tmp / "missing.txt", "--out", tmp / "a"], 2, "missing.txt: no such file"),
        ("train gpt2", ["--data", tmp / "data.csv", "--out", tmp / "a"], 2, "data.csv: expected a .txt or .jsonl"),
        ("train gpt2", ["--data", tmp / "broken.jsonl", "--out", tmp / "a"], 2, "broken.jsonl:2: malformed JSON"),
        ("train gpt2", ["--data", tmp / "nofield.jsonl", "--out", tmp / "a"], 2,
         "nofield.jsonl:1: no text field 'text' (use --text-field)"),
        ("train gpt2", [*corpus, tmp / "a", "--tokenizer", "bpe:many"], 2, "tokenizer='bpe:many': expected bpe:VOCAB"),
        ("train gpt2", [*corpus, tmp / "a", "--seq-len", "4096"], 2, "the training split: "),
        ("train gpt2", [*corpus, tmp / "a", "--mesh", "data=3"], 2, "--mesh 'data=3' needs 3 devices; there are"),
        ("train gpt2", ["--out", tmp / "nothing", "--resume"], 2, "holds no run (no run.json)"),
        ("train gpt2", [*corpus, tmp / "a", "--set", "schedule=cosin"], 2, "schedule='cosin': choose from"),
        ("train gpt2", [*corpus, tmp / "a", "--set", "foo=1"], 2, "--set 'foo=1': no setting 'foo'"),
        ("train gpt2", [*corpus, tmp / "a", "--init", tmp / "no-such-model"], 2, "no-such-model: no such directory"),
        ("train gpt2", [*corpus, tmp / "a", "--export-hf", tmp / "full"], 2, "the directory already holds files"),
        ("train gpt2", [*corpus, tmp / "a", "--model.n-head", "5"], 2, "n_embd=64 is not divisible by n_head=5"),
        # train_translator.py
        ("train translator", ["--out", tmp / "tr"], 2, "give the run a length: steps, epochs or max_minutes"),
        ("train translator", tr, 2, "bad.zip: not a readable zip file"),
        ("train translator", [*tr, "--schedule", "cosine", "--steps", "none", "--max-minutes", "1"], 2,
         "schedule=cosine needs the run's length"),
        ("train translator", [*tr, "--buckets", "8", "16"], 2, "buckets=(8, 16) must be increasing and end at"),
        ("train translator", [*tr, "--epochs", "-1"], 2, "epochs=-1.0: must be > 0"),
        # generate.py
        ("generate", ["--model", gpt2_dir, "--prompt", "Hi", "--max-new-tokens", "0"], 2, "0 must be >= 1"),
        ("generate", ["--model", gpt2_dir, "--prompt", "Hi", "--top-p", "1.5"], 2, "1.5 must lie in (0, 1]"),
        ("generate", ["--model", gpt2_dir, "--prompt", "Hi", "--temperature", "0"], 2, "0.0 must lie in (0,"),
        ("generate", ["--model", gpt2_dir, "--prompt", "Hi", "--top-k", "-3"], 2, "-3 must be >= 0"),
        ("generate", ["--model", tmp / "nope", "--prompt", "Hi"], 2, "nope: no such directory"),
        ("generate", ["--model", translator_dir, "--prompt", "Hi"], 2, "a translator's config, not GPT-2's"),
        ("generate", ["--model", gpt2_dir, "--prompt", ""], 2, "prompt 0 is empty"),
        ("generate", ["--model", gpt2_dir, "--prompt", "Hi", "--max-new-tokens", "500"], 2,
         "exceeds n_positions=128"),
        ("generate", ["--model", mismatch, "--prompt", "Hi"], 2, "mismatch/params: h/attn/c_attn/bias has shape (3, 192) in the checkpoint, (4, 192) expected from the config"),
        ("generate", ["--model", damaged, "--prompt", "Hi"], 2, f"{victim} has "),
        ("generate", ["--model", tmp / "hf-bad-json", "--prompt", "Hi"], 2, "config.json: malformed JSON at line 1"),
        # translate.py
        ("translate", ["--model", translator_dir, "--beam", "0", "Hi"], 2, "argument --beam: 0 must be >= 1"),
        ("translate", ["--model", translator_dir, "--batch-size", "-1", "Hi"], 2, "-1 must be >= 1"),
        ("translate", ["--model", tmp / "nope", "Hi"], 2, "nope: no config.json"),
        ("translate", ["--model", gpt2_dir, "Hi"], 2, "a GPT-2 model, not a translator"),
        ("translate", ["--model", translator_dir, "--input", tmp / "missing.txt"], 2, "missing.txt: No such file"),
        ("translate", ["--model", translator_dir, "--output", tmp / "taken.txt", "Hi"], 2,
         "taken.txt already exists; choose another output or pass --overwrite"),
        ("translate", ["--model", translator_dir], 2, "give sentences or --input FILE"),
        # eval_translator.py
        ("eval translator", ["--model", translator_dir, "--src", tmp / "two.txt", "--ref", tmp / "one.txt"], 2,
         "two.txt has 2 lines but"),
        ("eval translator", ["--model", translator_dir, "--src", tmp / "none.en", "--ref", tmp / "one.txt"], 2,
         "none.en: No such file"),
        # convert_gpt2.py
        ("convert", [gpt2_dir, tmp / "full"], 2, "full already exists and is not empty"),
        ("convert", ["--to-hf", tmp / "full", tmp / "out"], 2, "not a jaxformer checkpoint"),
        ("convert", [tmp / "hf-bad-json", tmp / "out2"], 2, "malformed JSON"),
        # capture.py, attention_map.py, induction_heads.py
        ("capture", ["--model", gpt2_dir, "--prompt", "Hi", "--out", tmp / "a.npz", "--ablate", "9.0"], 2,
         "head 9.0 does not exist: layers 0..2, heads 0..3"),
        ("capture", ["--model", gpt2_dir, "--prompt", "Hi", "--out", tmp / "a.npz", "--ablate", "x"], 2,
         "--ablate 'x': expected LAYER.HEAD"),
        ("capture", ["--model", gpt2_dir, "--prompt", "Hi", "--out", tmp / "taken.txt"], 2, "taken.txt already exists"),
        ("capture", ["--model", gpt2_dir, "--prompt", "", "--out", tmp / "b.npz"], 2, "--prompt is empty"),
        ("attention-map", ["--model", translator_dir, "--text", " ", "--out", tmp / "m"], 2, "--text is empty"),
        ("attention-map", ["--model", gpt2_dir, "--text", "Hi", "--out", tmp / "m"], 2, "a GPT-2 model, not a translator"),
        ("attention-map", ["--model", translator_dir, "--prompt", "Hi", "--out", tmp / "m"], 2,
         "a translator's config, not GPT-2's"),
        ("induction-heads", ["--model", gpt2_dir, "--length", "100"], 2, "twice it exceeds the model's n_positions=128"),
        # serve.py, eval_gpt2.py
        ("serve", [], 2, "give --gpt2 MODEL, --translator MODEL, or both"),
        ("serve", ["--gpt2", gpt2_dir, "--slots", "0"], 2, "argument --slots: 0 must be >= 1"),
        ("serve", ["--gpt2", gpt2_dir, "--dtype", "bfloat16", "--quantize", "int8"], 2, "give --dtype or --quantize"),
        ("serve", ["--gpt2", tmp / "nope", "--port", port], 2, "nope: no such directory"),
        ("serve", ["--translator", gpt2_dir, "--port", port], 2, "a GPT-2 model, not a translator"),
        ("eval gpt2", ["--model", tmp / "nope"], 2, "nope: no such directory"),
        ("eval gpt2", ["--model", gpt2_dir, "--weights", "int4"], 2, "argument --weights: invalid choice: 'int4'"),
        ("eval gpt2", ["--model", gpt2_dir, "--seq-len", "500"], 2, "--seq-len 500 exceeds the model's n_positions=128"),
        ("eval gpt2", ["--model", gpt2_dir], 2, "is not a training run with data/val.npy: give --data"),
        ("eval gpt2", ["--model", gpt2_dir, "--data", tmp / "missing.txt"], 2, "missing.txt: no such file"),
        # demo.py and the benchmarks
        ("demo", ["--preset", "gpt5"], 2, "unknown GPT-2 preset 'gpt5'"),
        ("bench_generate", ["--batch", "0"], 2, "argument --batch: 0 must be >= 1"),
        ("bench_generate", ["--preset", "gpt5", "--no-hf"], 2, "unknown GPT-2 preset"),
        ("bench_train", ["--seq-len", "4096", "--no-torch"], 2, "GPT-2 124M has 1024 positions"),
        ("bench_train", ["--steps", "0"], 2, "argument --steps: 0 must be >= 1"),
        ("bench_translator", ["--repeats", "0"], 2, "argument --repeats: 0 must be >= 1"),
        ("bench_translator", ["--model", tmp / "nope"], 2, "nope: no config.json"),
        ("bench_taps", ["--seq-len", "0"], 2, "argument --seq-len: 0 must be >= 1"),
        ("bench_taps", ["--seq-len", "2048"], 2, "--seq-len 2048 exceeds n_positions=1024"),
        ("bench_serve", ["--streams", "0"], 2, "argument --streams: 0 must be >= 1"),
        ("bench_serve", ["--only", "vllm"], 2, "--only 'vllm': choose among"),
        ("bench_serve", ["--jaxformer-extra", "[1]"], 2, "--jaxformer-extra '[1]': not a JSON object"),
    ]


@pytest.mark.slow
def test_every_script_answers_bad_input_with_a_clear_error(capsys, tmp_path, translator_dir, gpt2_dir):
    failures = []
    for script, argv, status, message in bad_inputs(tmp_path, translator_dir, gpt2_dir):
        got, _, err = call(capsys, script, *argv)
        if got != status or message not in err or "Traceback" in err:
            failures.append(f"{script} {' '.join(map(str, argv))}: exit {got}, stderr {err[-400:]!r}")
    assert not failures, "\n".join(failures)


def test_the_command_lists_its_verbs_and_names_an_unknown_one(capsys):
    status, out, _ = call(capsys, "--help")
    assert status == 0 and all(verb in out for verb in COMMANDS)
    status, out, _ = call(capsys, "train", "--help")
    assert status == 0 and "train gpt2" in out and "train translator" in out and "serve" not in out
    status, _, err = call(capsys, "trian")
    assert status == 2 and "unknown verb 'trian'; did you mean train" in err
    status, _, err = call(capsys, "eval", "bleu")
    assert status == 2 and "unknown verb 'eval bleu'" in err
    status, _, err = call(capsys, "serve", "--help")
    assert status == 0


def test_a_missing_extra_is_named_with_its_install_command(capsys, monkeypatch, gpt2_dir):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    status, _, err = call(capsys, "serve", "--gpt2", gpt2_dir, "--no-warmup")
    assert status == 2 and "Traceback" not in err
    assert "this command needs uvicorn, from the optional extra serve: pip install 'jaxformer[serve]'" in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    status, _, err = call(capsys, "generate", "--model", tmp_path / "nope", "--prompt", "Hi", "--debug")
    assert status == 2 and "Traceback" in err and "error: " in err


@pytest.mark.slow
def test_invalid_utf8_is_replaced_with_a_warning_naming_the_line(capsys, tmp_path, translator_dir):
    (tmp_path / "in.txt").write_bytes("Hello.\nCaf\xe9?\n".encode("latin-1") + b"Good\n")
    status, out, err = call(capsys, "translate", "--model", translator_dir, "--beam", "1", "--input",
                            tmp_path / "in.txt")
    assert status == 0 and f"warning: {tmp_path / 'in.txt'}: line 2 is not valid UTF-8" in err
    assert len(out.splitlines()) == 3


def test_every_verb_and_benchmark_has_main_argv_and_the_boundary():
    root = pathlib.Path(__file__).resolve().parents[1]
    commands = [root / "jaxformer" / "commands" / f"{module}.py" for module, _ in COMMANDS.values()]
    for path in commands + sorted((root / "scripts").glob("*.py")):
        text = path.read_text()
        assert "def main(argv=None) -> int:" in text and ("cli.run(" in text or "train_main(" in text), path.name
    for path in sorted((root / "scripts").glob("*.py")):
        assert "sys.exit(main())" in path.read_text(), path.name


def test_numbers_in_ranges():
    assert cli.at_least(1)("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="0 must be >= 1"):
        cli.at_least(1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"must lie in \(0, 1\]"):
        cli.number_in(0, 1, low_open=True)("0")
    assert np.isclose(cli.number_in(0, 1)("0.5"), 0.5)
