"""A target for a forked process that imports only the standard library (test_forkserver_preload)."""

import sys


def imported(queue, modules: list[str]) -> None:
    queue.put([name in sys.modules for name in modules])
