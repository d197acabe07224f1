#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (Python 3.11) on first use, then
#   ./run.sh demo   - runs sync_call_task end to end on a SQLite CRM of its own + the simulator
#   ./run.sh test   - runs the test suite (needs MariaDB on 127.0.0.1:3306, root, empty password,
#                     Redis and RabbitMQ; installs Debian's chromium for the browser test if missing)
#   ./run.sh ui     - starts the simulator and `call-pipeline serve` on the demo CRM (sensors + schedule live)
#   ./run.sh bench  - the performance benchmark (see README)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

setup() {
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
  fi
  # Reinstall only when the dependencies changed. The tools (the simulator, the demo, the
  # benchmark) are a distribution of their own in tools/, kept out of call_pipeline's wheel.
  local stamp=.venv/.call_pipeline-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ tools/pyproject.toml -nt "$stamp" ]; then
    # uv resolves and installs the same versions as pip in half the time (25 s against 56 s on a
    # fresh clone here); pip is the fallback where uv cannot be installed or cannot reach its
    # index (uv reads PyPI, not pip's configuration). --compile-bytecode: pip writes every
    # module's .pyc at install and uv does not; where PYTHONDONTWRITEBYTECODE is set (this machine
    # sets it), every process would compile Dagster from source (the suite took 60% longer).
    if .venv/bin/python -m pip install -q uv >/dev/null 2>&1 &&
       .venv/bin/python -m uv pip install -q --compile-bytecode --python .venv/bin/python -e ".[dev]" -e ./tools
    then :
    else
      echo "setup: uv was not available; installing with pip" >&2
      .venv/bin/python -m pip install -q --upgrade pip >/dev/null
      .venv/bin/python -m pip install -q -e ".[dev]" -e ./tools
    fi
    touch "$stamp"
  fi
  # The project's own modules, compiled as pip and uv compile an installed package's: where
  # PYTHONDONTWRITEBYTECODE is set, each of the suite's and a deployment's processes would
  # compile them again (0.2 s of CPU an import of the definitions). Up to date: 0.05 s.
  .venv/bin/python -m compileall -q -j 0 call_pipeline tools/call_pipeline_tools call_pipeline_tests >/dev/null
}

# (The demo, the UI, the benchmark and the tests drop proxy variables themselves: the Alibaba SDK
# ignores NO_PROXY, call_pipeline/clients/proxies.py.)

cmd=${1:-}
shift || true
case "$cmd" in
  demo)  setup; exec .venv/bin/call-pipeline demo "$@" ;;
  # the browser test drives Debian's chromium: installed here when missing (needs apt-get)
  # the suite waits on processes and servers far more than it computes: it runs on
  # CALL_PIPELINE_TEST_WORKERS pytest-xdist workers (4; -n 0 runs it in one process)
  test)  setup; ./scripts/install-browser.sh
         exec .venv/bin/python -m pytest -n "${CALL_PIPELINE_TEST_WORKERS:-4}" --dist loadgroup "$@" ;;
  ui)    setup; exec .venv/bin/call-pipeline ui "$@" ;;
  bench) setup; exec .venv/bin/call-pipeline bench "$@" ;;
  setup) setup ;;
  *) echo "usage: ./run.sh {demo|test|ui|bench|setup} [args]" >&2; exit 2 ;;
esac
