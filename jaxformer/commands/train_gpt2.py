"""Train GPT-2 from scratch or fine-tune it, on one device or a mesh of many.

    jaxformer train gpt2 --out runs/shakespeare                  # tiny GPT-2 on Tiny Shakespeare
    jaxformer train gpt2 --out runs/shakespeare --resume --steps 2000    # continue, longer
    jaxformer train gpt2 --data corpus.jsonl --out runs/ft --init gpt2 --lr 1e-4 \\
        --model.dtype bfloat16 --mesh data=4,fsdp=2 --export-hf runs/ft-hf

Every setting is a flag (below) and can also be set by name: --set schedule=constant,
--set model.n_layer=4. --resume continues the run in --out with its stored settings; it may change
only the length (steps, epochs, max_minutes), the cadence, the evaluation and the outputs.
SIGTERM/SIGINT: the current step finishes, a checkpoint is written, exit status 0. Exit status 1:
the loss became NaN/Inf (the message names the step); 2: bad input.
"""

from jaxformer.commands.cli import train_main
from jaxformer.gpt2.train import GPT2Task


def main(argv=None) -> int:
    return train_main(argv, GPT2Task, __doc__, "jaxformer train gpt2")
