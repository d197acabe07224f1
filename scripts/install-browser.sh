#!/usr/bin/env bash
# The browser test's system packages (call_pipeline_tests/test_ui_browser.py): Debian's chromium,
# which Playwright drives through `executable_path` (`playwright install` downloads a browser build
# of its own, which this project's machines cannot fetch), and a CJK font so that the demo's Chinese
# task names render. Idempotent: nothing is installed when both are there already.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
FONT_PACKAGE=fonts-wqy-zenhei

have_font() {
  dpkg-query -W -f='${Status}' "$FONT_PACKAGE" 2>/dev/null | grep -q "install ok installed"
}

if [ -x "$CHROMIUM" ] && have_font; then
  echo "install-browser: $CHROMIUM and $FONT_PACKAGE are installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium "$FONT_PACKAGE" fontconfig
if [ ! -x "$CHROMIUM" ]; then
  echo "install-browser: $CHROMIUM is still missing after apt-get install chromium" >&2
  exit 1
fi
"$CHROMIUM" --version
