"""lm-eval's own ``local-completions`` model scoring a running ``jaxformer serve`` through
``/v1/completions`` (``echo`` with prompt ``logprobs``, ``max_tokens: 0``) on a local task written
here, its log-likelihoods checked against Hugging Face PyTorch (float64) on the same random model."""

import socket
import subprocess
import sys
import time
import urllib.request

import lm_eval
import numpy as np
import pytest
from lm_eval.tasks import TaskManager
from test_lm_eval import Reference, write_tasks

from jaxformer.gpt2.tokenizer import GPT2_DIR

pytestmark = pytest.mark.slow  # a server subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory):
    path, model = hf_dir("small")
    port, log = free_port(), tmp_path_factory.mktemp("lm-eval-serve") / "serve.log"
    cmd = [sys.executable, "-m", "jaxformer", "serve", "--gpt2", str(path), "--port", str(port), "--slots", "2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            opener.open(f"{url}/health", timeout=5).read()
            break
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
    yield url, path.name, model
    proc.terminate()
    proc.wait(timeout=30)


def test_local_completions_scores_the_server_as_hf_does(server, tmp_path, monkeypatch):
    url, name, model = server
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    write_tasks(tmp_path)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={url}/v1/completions,model={name},tokenizer_backend=huggingface,"
                   f"tokenizer={GPT2_DIR},num_concurrent=1,max_retries=1",
        tasks=["jf_choice"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        bootstrap_iters=0)
    ref = Reference(model)
    samples = results["samples"]["jf_choice"]
    assert len(samples) == 5
    for sample in samples:
        got = [resp[0][0] for resp in sample["resps"]]
        want = [ref.loglikelihood(*args)[0] for args in sample["arguments"]]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
