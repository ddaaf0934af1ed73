"""EleutherAI's lm-eval harness on a GPT-2: jaxformer/eval/harness.py's model, ``jaxformer``.

    jaxformer eval lm-eval --model ckpt/gpt2 --tasks hellaswag arc_easy --output results.json
    jaxformer eval lm-eval --model gpt2 --tasks my_task --include-path tasks/ --limit 50 --log-samples --output r.json

Runs ``lm_eval.simple_evaluate`` and writes its results JSON (metrics, task configs, versions, and
with --log-samples each document's requests and responses under "samples"); prints lm-eval's table.
--tasks: lm-eval task, group or tag names, or task YAML files; --include-path adds a directory of
task YAMLs. lm-eval's own tasks fetch their data from the Hugging Face hub; offline, set
HF_DATASETS_OFFLINE=1 with the data in the datasets cache, or use local tasks (``dataset_path: json``
with ``dataset_kwargs: {data_files: ...}``), which need no network.
"""

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer eval lm-eval")
    ap.add_argument("--model", required=True, help="jaxformer checkpoint or training run, HF directory or hub id")
    ap.add_argument("--tasks", required=True, nargs="+", help="task names (or comma-separated lists of them)")
    ap.add_argument("--include-path", help="a directory of extra task YAML files")
    ap.add_argument("--limit", type=cli.at_least(1), help="evaluate the first N documents of each task")
    ap.add_argument("--num-fewshot", type=cli.at_least(0), help="few-shot examples (default: each task's)")
    ap.add_argument("--batch-size", type=cli.at_least(1), default=16, help="rows per batch")
    ap.add_argument("--bootstrap-iters", type=cli.at_least(0), default=100000,
                    help="bootstrap iterations for the standard errors of some metrics (0: none)")
    ap.add_argument("--log-samples", action="store_true", help="keep each document's requests and responses")
    ap.add_argument("--output", required=True, help="the results JSON file to write")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), args.debug)


def run(args) -> int:
    import difflib
    import json
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    import jaxformer.eval.harness  # noqa: F401  (registers the model "jaxformer")
    from jaxformer.errors import InputError

    if args.include_path and not Path(args.include_path).is_dir():
        raise InputError(f"--include-path {args.include_path}: no such directory")
    tasks = [t for part in args.tasks for t in part.split(",") if t]
    manager = TaskManager(include_path=args.include_path)
    for t in tasks:
        if t not in manager.all_tasks and not Path(t).is_file():
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            raise InputError(f"--tasks: no lm-eval task {t!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                   else " (a task directory: --include-path)"))
    results = lm_eval.simple_evaluate(
        model="jaxformer", model_args={"pretrained": args.model}, tasks=tasks, batch_size=args.batch_size,
        limit=args.limit, num_fewshot=args.num_fewshot, log_samples=args.log_samples, task_manager=manager,
        bootstrap_iters=args.bootstrap_iters)
    print(make_table(results))
    Path(args.output).write_text(json.dumps(results, indent=1, default=handle_non_serializable,
                                            ensure_ascii=False) + "\n")
    print(f"wrote {args.output}")
    return 0
