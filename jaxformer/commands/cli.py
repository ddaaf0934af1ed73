"""The command-line contract every ``jaxformer`` verb (and every ``scripts/bench_*.py``) follows.

* ``main(argv) -> int`` runs the command's body inside one error boundary (:func:`run`): an expected
  failure (:class:`~jaxformer.errors.InputError`, a file that cannot be read or written) prints
  ``error: <message>`` naming the file, key, value or line and exits 2; a run that failed (a NaN
  loss) exits 1; Ctrl-C exits 130. No traceback, unless ``--debug``; a genuine bug keeps its
  traceback. Warnings print as ``warning: <message>``. Usage errors are argparse's (exit 2). A
  missing optional extra (FastAPI for ``serve``, torch for ``demo``) names the extra to install.
* The trainers' flags are derived from their config dataclasses (:func:`add_config_flags`): every
  run-config field is ``--field-name VALUE``, every architecture field ``--model.field-name VALUE``,
  each with its type, help and default, and ``--set FIELD=VALUE`` sets any of them by name.

argparse with this small generator rather than a library (tyro, draccus, simple-parsing): the flags
stay plain argparse for both trainers and every other script, values are checked by the configs
themselves (one place, one message style), and nothing formats errors its own way.
"""

import argparse
import dataclasses
import difflib
import logging
import sys
import traceback
import warnings
from pathlib import Path

from jaxformer.config import field_types, parse_text
from jaxformer.errors import InputError

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
# Modules of optional extras (pyproject.toml) -> the extra that installs them.
EXTRAS = {"torch": "torch", "transformers": "torch", "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve",
          "datasets": "data", "pyarrow": "data", "zstandard": "data", "tiktoken": "data", "lm_eval": "eval"}


def parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser named ``prog`` (e.g. ``jaxformer generate``) showing ``doc`` with its layout,
    with ``--debug``."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return ap


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def run(body, debug: bool = False) -> int:
    """Calls ``body() -> int | None`` inside the error boundary; returns the exit status."""
    from jaxformer.train.step import NonFiniteLoss

    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's informational warnings
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return body() or 0
    except NonFiniteLoss as e:
        return _fail(e, debug, EXIT_FAILED)
    except InputError as e:
        return _fail(e, debug, EXIT_BAD_INPUT)
    except OSError as e:  # a file that cannot be read or written: name it
        return _fail(e, debug, EXIT_BAD_INPUT, f"{e.filename}: {e.strerror}" if e.filename else None)
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").partition(".")[0])
        if extra is None:
            raise
        return _fail(e, debug, EXIT_BAD_INPUT, f"this command needs {e.name}, from the optional extra "
                                               f"{extra}: pip install 'jaxformer[{extra}]'")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.showwarning = previous


def _fail(e: BaseException, debug: bool, status: int, message: str | None = None) -> int:
    if debug:
        traceback.print_exc()
    print(f"error: {message or e}", file=sys.stderr)
    return status


# --- argument types for scripts without a config -----------------------------------------------------

def at_least(low: int):
    """argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value
    return parse


def number_in(low: float, high: float, *, low_open: bool = False):
    """argparse type: a float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{value} must lie in {'(' if low_open else '['}{low}, {high}]")
        return value
    return parse


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """``path`` for a new output: an InputError if it holds something (a file, a non-empty
    directory), unless ``overwrite``."""
    path = Path(path)
    if overwrite or not path.exists():
        return path
    if path.is_dir() and not any(path.iterdir()):
        return path
    raise InputError(f"{path} already exists{' and is not empty' if path.is_dir() else ''}; "
                     "choose another output or pass --overwrite")


# --- flags from configs ----------------------------------------------------------------------------

def add_config_flags(ap: argparse.ArgumentParser, cls, prefix: str = "", title: str | None = None,
                     defaults: dict | None = None) -> None:
    """One flag per field of the dataclass ``cls``: ``--{prefix}field-name VALUE`` (several values
    for a list field) with the field's help and default (``defaults[name]`` where given, else the
    dataclass's). Flags that are not given are absent from the parsed namespace (so presets and
    stored settings apply); :func:`overrides` collects them."""
    group = ap.add_argument_group(title) if title else ap
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        tp = types[f.name]
        many = getattr(tp, "__origin__", None) is tuple  # values: several, or comma-separated
        default = (defaults or {}).get(f.name, f.default)
        default = ",".join(map(str, default)) if many else default
        help_ = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        group.add_argument(flag, dest=f"{prefix}{f.name}", default=argparse.SUPPRESS, help=help_,
                           nargs="+" if many else None, metavar="VALUE", type=_argtype(tp, flag))


def _argtype(tp, flag: str):
    def parse(text: str):
        try:
            return parse_text(tp, text, flag)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).replace(f"{flag}=", "", 1)) from None
    parse.__name__ = flag  # argparse names the type in some messages
    return parse


def overrides(args: argparse.Namespace, run_cls, model_cls, model_prefix: str = "model.") -> tuple[dict, dict]:
    """(run-config fields, architecture fields) given on the command line, ``--set`` included.

    ``--set FIELD=VALUE`` names a run-config field, ``model.FIELD`` an architecture field, or an
    architecture field by its bare name when no run-config field has it."""
    ns = vars(args)
    run_fields = {f.name: f for f in dataclasses.fields(run_cls)}
    model_fields = {f.name: f for f in dataclasses.fields(model_cls)}
    run = {k: _as_value(v) for k, v in ns.items() if k in run_fields}
    model = {k[len(model_prefix):]: _as_value(v) for k, v in ns.items() if k.startswith(model_prefix)}
    for item in getattr(args, "set", None) or []:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep:
            raise InputError(f"--set {item!r}: expected FIELD=VALUE")
        if name in run_fields:
            run[name] = parse_text(field_types(run_cls)[name], text, name)
        elif name.removeprefix(model_prefix) in model_fields:
            name = name.removeprefix(model_prefix)
            model[name] = parse_text(field_types(model_cls)[name], text, f"{model_prefix}{name}")
        else:
            known = list(run_fields) + [model_prefix + n for n in model_fields]
            close = difflib.get_close_matches(name, known, n=3)
            raise InputError(f"--set {item!r}: no setting {name!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                       else ""))
    return run, model


def _as_value(v):
    """A flag's value; the parts of a list flag (each a tuple) joined."""
    return tuple(x for part in v for x in part) if isinstance(v, list) else v


def train_main(argv, task_cls, doc: str, prog: str) -> int:
    """The command line of a trainer (``jaxformer train gpt2|translator``): flags from the task's run config and
    architecture config, then :func:`jaxformer.train.loop.train` inside the error boundary."""
    from jaxformer.train import distributed

    ap = parser(doc, prog)
    ap.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plot, tokenizer, data)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    ap.add_argument("--mesh", help="device mesh, e.g. data=4,fsdp=2 (default: data parallel over all devices)")
    ap.add_argument("--metrics", metavar="PATH", help="JSONL metrics (default OUT/metrics.jsonl)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="set any setting by name, e.g. --set schedule=cosine or --set model.n_layer=4 (repeatable)")
    distributed.add_arguments(ap)
    presets = ", ".join(task_cls.presets)
    add_config_flags(ap, task_cls.run_config, defaults=task_cls.run_defaults(),
                     title=f"run settings (run.json; the defaults shown are the default preset's; presets: {presets})")
    add_config_flags(ap, task_cls.model_config, "model.", "architecture (config.json; fresh runs only)")
    args = ap.parse_args(argv)

    def body():
        from jaxformer.train.loop import train

        run_set, model_set = overrides(args, task_cls.run_config, task_cls.model_config)
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        train(task_cls, args.out, run=run_set, model=model_set, resume=args.resume, mesh=args.mesh,
              metrics_path=args.metrics, progress=not args.no_progress)
        return 0
    return run(body, args.debug)
