"""Train the English→French translator.

    jaxformer train translator --out runs/tr --max-minutes 30
    jaxformer train translator --out runs/tr --resume --max-minutes 20      # 20 more minutes
    jaxformer train translator --out runs/book --preset book --epochs 10 --set schedule=cosine

Data: --data (fra-eng.zip or the fra.txt in it), else $JAXFORMER_DATA/fra-eng/fra-eng.zip, else
~/.cache/jaxformer/fra-eng/fra-eng.zip (downloaded from manythings.org when online).
Every setting is a flag (below) and can also be set by name: --set warmup=1000,
--set model.d_model=256. --resume continues the run in --out with its stored settings; it may
change only the length (steps, epochs, max_minutes), the cadence, the evaluation and the outputs.
--mesh data=4,fsdp=2 shards batches over data x fsdp and parameters and optimizer state over fsdp.
SIGTERM/SIGINT: the current step finishes, a checkpoint is written, exit status 0. Exit status 1:
the loss became NaN/Inf (the message names the step); 2: bad input.
"""

from jaxformer.commands.cli import train_main
from jaxformer.translator.train import TranslatorTask


def main(argv=None) -> int:
    return train_main(argv, TranslatorTask, __doc__, "jaxformer train translator")
