"""``python -m callfs.worker``: a worker process of a node with ``server.workers`` > 1, started by
its primary process (``callfs.workers``), never by hand."""

from __future__ import annotations

import signal
import sys

# Before anything else: Ctrl-C (and a terminal's hangup) reaches the whole process group; the
# primary stops its workers.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)

from callfs.daemon import run_worker  # noqa: E402
from callfs.workers import read_spec  # noqa: E402


def main() -> None:
    sys.exit(run_worker(read_spec()))


if __name__ == "__main__":
    main()
