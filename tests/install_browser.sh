#!/bin/sh
# The browser the web-page test drives (tests/test_serve.py): Debian's headless Chromium and its
# matching chromedriver (apt keeps the two versions together). Idempotent and quiet: nothing is
# done when both are installed. Needs root (or sudo) and the Debian package registry.
set -eu
if ! dpkg-query -W -f='${Status}\n' chromium chromium-driver 2>/dev/null | grep -c '^install ok installed$' | grep -q '^2$'; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
/usr/lib/chromium/chromium --version >/dev/null
/usr/bin/chromedriver --version >/dev/null
