"""A tour of what jaxformer does, on a machine with no pretrained weights.

Builds a random-weight GPT-2 with transformers, converts it to jaxformer, checks the logits against
PyTorch, generates with greedy and nucleus sampling, converts back to Hugging Face format and
reloads it with ``GPT2LMHeadModel.from_pretrained``.

    jaxformer demo [--preset gpt2] [--out DIR]
"""

import tempfile
import time
from pathlib import Path

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer demo")
    ap.add_argument("--preset", default="gpt2", help="GPT-2 size to build with random weights")
    ap.add_argument("--out", help="keep the converted checkpoints here (default: a temporary directory)")
    args = ap.parse_args(argv)
    return cli.run(lambda: demo(args), args.debug)


def demo(args) -> int:
    import jax
    import numpy as np
    import torch
    import transformers

    from jaxformer.gpt2 import hf
    from jaxformer.gpt2.config import preset
    from jaxformer.gpt2.generate import generate
    from jaxformer.gpt2.model import GPT2
    from jaxformer.gpt2.pretrained import load_pretrained, save_pretrained
    from jaxformer.gpt2.tokenizer import GPT2_DIR

    config = preset(args.preset)
    out = Path(cli.check_output(args.out) if args.out else tempfile.mkdtemp(prefix="jaxformer-demo-"))
    tokenizer_dir = GPT2_DIR
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(**config.to_hf_dict())
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.save_pretrained(out / "hf")
    print(f"1. random-weight HF {args.preset} saved to {out / 'hf'}")

    config, params, _ = load_pretrained(out / "hf", scan_layers=False)
    save_pretrained(out / "jaxformer", config, params, tokenizer_dir=tokenizer_dir)
    config, params, tok = load_pretrained(out / "jaxformer", scan_layers=False)
    print(f"2. converted to a jaxformer checkpoint: {out / 'jaxformer'} "
          f"({sum(x.size for x in jax.tree.leaves(params)):,} parameters)")

    text = "The quick brown fox jumps over the lazy dog."
    ids = np.array([tok.encode(text)])
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    logits, _ = jax.jit(lambda p, x: GPT2(config).apply({"params": p}, x))(params, ids)
    print(f"3. max |logit difference| against PyTorch: {np.abs(np.asarray(logits) - ref).max():.2e}")

    prompt = tok.encode("Once upon a time")
    for label, kw in [("greedy", dict(greedy=True)), ("top-p 0.9, T 0.8", dict(top_p=0.9, temperature=0.8, seed=1))]:
        start = time.perf_counter()
        new = generate(params, config, [prompt], max_new_tokens=32, stop_at_eos=False, **kw)[0]
        print(f"4. {label}: {len(new)} tokens in {time.perf_counter() - start:.2f} s incl. compilation "
              f"(random weights, so the text is noise): {tok.decode(new)[:60]!r}")

    hf.save_hf(out / "hf-back", config, params, tokenizer_dir=tokenizer_dir)
    back = transformers.GPT2LMHeadModel.from_pretrained(out / "hf-back").eval()
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    print(f"5. converted back to HF at {out / 'hf-back'}; from_pretrained gives identical tensors: {same}")
    return 0
