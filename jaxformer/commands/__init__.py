"""The ``jaxformer`` command: one verb per job, each a module here with ``main(argv) -> int``.

``jaxformer --help`` lists the verbs, ``jaxformer VERB --help`` a verb's flags. Every verb keeps
the contract of :mod:`jaxformer.commands.cli` (one error boundary: ``error: ...``, exit 2, no
traceback). Modules are imported only when their verb runs, so ``--help`` starts at once.
"""

import difflib
import sys

# verb -> (module, what it does)
COMMANDS = {
    "convert": ("convert", "convert GPT-2 checkpoints: Hugging Face <-> jaxformer, bf16/int8, LoRA runs to PEFT"),
    "generate": ("generate", "generate text with GPT-2 (greedy, temperature, top-k, top-p; --lora adapters)"),
    "train gpt2": ("train_gpt2", "pretrain or fine-tune GPT-2 (all weights or LoRA) on text or token shards"),
    "train translator": ("train_translator", "train the English->French translator"),
    "translate": ("translate", "translate English sentences to French"),
    "eval translator": ("eval_translator", "BLEU and chrF of the translator on a test set (sacrebleu)"),
    "eval gpt2": ("eval_gpt2", "GPT-2 perplexity on a text, optionally against Hugging Face PyTorch"),
    "eval hellaswag": ("eval_hellaswag", "HellaSwag accuracy (acc, acc_norm) of a GPT-2, scored as llm.c does"),
    "eval lm-eval": ("eval_lm_eval", "run EleutherAI's lm-eval harness tasks on a GPT-2"),
    "prepare": ("prepare", "tokenize text corpora into llm.c-format token shards for pretraining"),
    "serve": ("serve", "serve GPT-2 and LoRA adapters on it (OpenAI completions API) and the translator over HTTP"),
    "capture": ("capture", "capture GPT-2's hidden states, attentions and logits to .npz"),
    "attention-map": ("attention_map", "attention heatmaps and the logit lens as PNG files"),
    "induction-heads": ("induction_heads", "score GPT-2's heads for induction on repeated random tokens"),
    "demo": ("demo", "a tour: random-weight GPT-2 from transformers, converted, checked, generating"),
}
GROUPS = sorted({v.split()[0] for v in COMMANDS if " " in v})  # verbs with sub-verbs: train, eval


def usage(group: str | None = None) -> str:
    verbs = [v for v in COMMANDS if group is None or v.split()[0] == group]
    width = max(map(len, verbs))
    lines = [f"  {v:<{width}}  {COMMANDS[v][1]}" for v in verbs]
    head = f"usage: jaxformer {group or ''}{' ' if group else ''}VERB [--help] ..."
    return "\n".join([head, "", "verbs:" if group is None else f"{group} verbs:", *lines, "",
                      f"jaxformer {group + ' ' if group else ''}VERB --help shows a verb's flags."])


def main(argv=None) -> int:
    """Runs ``jaxformer VERB ARGS...``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    for n in (2, 1):
        verb = " ".join(argv[:n])
        if len(argv) >= n and verb in COMMANDS:
            import importlib
            return importlib.import_module(f"jaxformer.commands.{COMMANDS[verb][0]}").main(argv[n:])
    if argv[:1] == ["--version"]:
        from importlib.metadata import PackageNotFoundError, version
        try:
            print(f"jaxformer {version('jaxformer')}")
        except PackageNotFoundError:
            print("jaxformer (not installed)")
        return 0
    group = argv[0] if argv and argv[0] in GROUPS else None
    rest = argv[1:] if group else argv
    if not rest or rest[0] in ("-h", "--help"):
        print(usage(group), file=sys.stdout if rest else sys.stderr)
        return 0 if rest else 2
    asked = " ".join(argv[:2] if group else argv[:1])
    close = difflib.get_close_matches(asked, [*COMMANDS, *GROUPS], n=2)
    print(f"{usage(group)}\n\nerror: unknown verb {asked!r}" + (f"; did you mean {' or '.join(close)}?" if close
                                                                else ""), file=sys.stderr)
    return 2
