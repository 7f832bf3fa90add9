"""``python -m callfs.worker``: a worker process of a node with ``server.workers`` > 1, started by
its primary process (``callfs.workers``), never by hand."""

from __future__ import annotations

import sys

from callfs.daemon import run_worker
from callfs.workers import read_spec


def main() -> None:
    sys.exit(run_worker(read_spec()))


if __name__ == "__main__":
    main()
