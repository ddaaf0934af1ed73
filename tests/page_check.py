"""The web page in headless Chromium against a running server: a streamed generation that grows on
screen and a two-sentence translation; a screenshot at the end. What the page shows is checked
against the API itself (greedy generation and beam search are deterministic), so the check holds
for any model. :func:`check_hostile_text`: the page asks for an API key once per tab and shows
markup in a prompt and a continuation as text, running none of it. Used by test_serve.py (and to
make the README's screenshot)."""

import json
import urllib.request

import pytest
from browser import chromium_driver, missing

TIMEOUT = 60  # seconds, for every wait
POLL = 0.05
MAX_TOKENS = 32
PROMPT = "The quick brown fox"
SENTENCES = ["I am cold.", "Try not to laugh."]

# Records every length the generated text passes through (characterData old values included), so that
# growth is seen even when tokens arrive faster than selenium polls.
OBSERVE = """
window.__lengths = [];
const out = document.getElementById('output');
window.__observer && window.__observer.disconnect();
window.__observer = new MutationObserver((records) => {
  for (const r of records)
    if (r.type === 'characterData' && r.oldValue !== null) window.__lengths.push(r.oldValue.length);
  const c = out.querySelector('.completion');
  if (c) window.__lengths.push(c.textContent.length);
});
window.__observer.observe(out, {subtree: true, childList: true, characterData: true, characterDataOldValue: true});
"""


def _opener():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never a proxy


def get_json(url: str):
    with _opener().open(url, timeout=TIMEOUT) as r:
        return json.load(r)


def post_json(url: str, body: dict):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with _opener().open(req, timeout=TIMEOUT) as r:
        return json.load(r)


def _set(driver, element_id: str, text: str):
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(text)


def _text(driver, selector: str) -> str:
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                                 selector)


def check_page(server_url: str, screenshot_path) -> None:
    reason = missing()
    if reason:
        pytest.fail(f"browser test: {reason}")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    served = get_json(f"{server_url}/v1/models")["data"]
    gpt2 = next(m["id"] for m in served if m.get("task", "completion") == "completion")
    translator = next(m["id"] for m in served if m.get("task") == "translation")

    with chromium_driver() as d:
        wait = WebDriverWait(d, TIMEOUT, poll_frequency=POLL)
        d.get(f"{server_url}/")
        assert d.title == "jaxformer"
        wait.until(EC.visibility_of_element_located((By.ID, "gpt2_panel")))
        wait.until(EC.visibility_of_element_located((By.ID, "translator_panel")))
        assert d.find_element(By.ID, "gpt2_model").text == gpt2
        assert d.find_element(By.ID, "translator_model").text == translator

        # --- a greedy generation, streamed ---
        _set(d, "prompt", PROMPT)
        _set(d, "max_tokens", str(MAX_TOKENS))
        _set(d, "temperature", "0")
        _set(d, "seed", "0")
        d.execute_script(OBSERVE)
        d.find_element(By.ID, "generate").click()
        polled = []

        def finished(drv):
            status = drv.find_element(By.ID, "status").text
            polled.append(len(_text(drv, "#output .completion") or ""))
            return status.startswith(("done", "error", "stopped")) and status

        status = wait.until(finished)
        assert status.startswith("done"), status
        completion = _text(d, "#output .completion")
        assert _text(d, "#output") == PROMPT + completion
        assert completion, "no text was generated"
        partial = {n for n in polled + d.execute_script("return window.__lengths") if 0 < n < len(completion)}
        assert len(partial) >= 2, f"the output did not grow token by token: lengths seen {sorted(partial)}"
        expected = post_json(f"{server_url}/v1/completions", dict(
            model=gpt2, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, seed=0))
        assert completion == expected["choices"][0]["text"], "the streamed text differs from the API's"
        print(f"\npolled lengths {sorted(set(polled))}; {len(partial)} partial lengths; {status}")

        # --- two sentences, beam 2 ---
        _set(d, "source", "\n".join(SENTENCES))
        Select(d.find_element(By.ID, "beam")).select_by_value("2")
        d.find_element(By.ID, "translate").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "translate_status"), "done"))
        lines = _text(d, "#translation").split("\n")
        assert len(lines) == 2 and all(line.strip() for line in lines), lines
        expected = post_json(f"{server_url}/v1/translations", dict(model=translator, input=SENTENCES, beam_size=2))
        assert lines == expected["translations"]

        assert d.save_screenshot(str(screenshot_path))
    with open(screenshot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def check_hostile_text(server_url: str, key: str, prompt: str, continuation: str, screenshot_path) -> None:
    """Against a server that needs ``key`` and continues every prompt with ``continuation``."""
    reason = missing()
    if reason:
        pytest.fail(f"browser test: {reason}")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium_driver() as d:
        wait = WebDriverWait(d, TIMEOUT, poll_frequency=POLL)
        d.get(f"{server_url}/")
        wait.until(EC.visibility_of_element_located((By.ID, "key_panel")))
        assert not d.find_element(By.ID, "gpt2_panel").is_displayed()
        _set(d, "api_key", "not the key")
        d.find_element(By.ID, "use_key").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "key_status"), "refused"))
        _set(d, "api_key", key)
        d.find_element(By.ID, "use_key").click()
        wait.until(EC.visibility_of_element_located((By.ID, "gpt2_panel")))
        assert not d.find_element(By.ID, "key_panel").is_displayed()
        d.refresh()  # the key is kept for the tab
        wait.until(EC.visibility_of_element_located((By.ID, "gpt2_panel")))
        assert not d.find_element(By.ID, "key_panel").is_displayed()
        assert d.execute_script("return sessionStorage.length") == 1

        _set(d, "prompt", prompt)
        _set(d, "temperature", "0")
        d.find_element(By.ID, "generate").click()
        status = wait.until(lambda drv: (t := drv.find_element(By.ID, "status").text).startswith(("done", "error"))
                            and t)
        assert status.startswith("done"), status
        assert _text(d, "#output") == prompt + continuation
        assert d.execute_script("return document.querySelectorAll('#output *').length") == 2  # the two spans
        assert d.execute_script("return window.__pwned === undefined && document.title") == "jaxformer"
        assert d.save_screenshot(str(screenshot_path))
