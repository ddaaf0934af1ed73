"""Headless Debian Chromium for the web-page tests, through selenium and Debian's chromedriver.

    with chromium_driver() as driver:
        driver.get(url)

Both paths are explicit (``$CHROMEDRIVER``, ``$CHROMIUM`` override them), so Selenium Manager, which
would try to download a driver, is never consulted. ``missing()`` says what is not installed
(``tests/install_browser.sh`` installs it), for a skip or a failure message.
"""

import contextlib
import importlib.util
import os
import subprocess

CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/lib/chromium/chromium")  # the binary; /usr/bin/chromium is a shell wrapper
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # required as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1200,900",
    # No traffic beyond the page under test.
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)


def missing() -> str | None:
    """What the browser tests lack (None when everything is there)."""
    lacking = [path for path in (CHROMEDRIVER, CHROMIUM) if not os.access(path, os.X_OK)]
    if importlib.util.find_spec("selenium") is None:
        lacking.append("the selenium package")
    return f"missing {', '.join(lacking)} (run tests/install_browser.sh)" if lacking else None


@contextlib.contextmanager
def chromium_driver(page_load_timeout: float = 30, flags: tuple[str, ...] = FLAGS):
    """A selenium WebDriver on headless Chromium; the browser and its driver end with the block."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in flags:
        options.add_argument(flag)
    service = Service(CHROMEDRIVER, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(page_load_timeout)
        driver.set_script_timeout(page_load_timeout)
        yield driver
    finally:
        driver.quit()
