"""Runs one of the package's benchmark comparisons and writes its results
into the committed results beside this script, ``benchmarks/results/``: the
one way results get there, on purpose.

Usage (from anywhere)::

    python benchmarks/run_benchmark.py splitmnist --overwrite   # a new table
    python benchmarks/run_benchmark.py splitfmnist --strategies dgr --update

An existing results file is replaced only with ``--overwrite``; ``--update``
replaces the runs of the strategies and seeds run now and keeps the others.
``--quick`` is refused here (``avl-genreplay bench --quick`` writes its smoke
comparison under ``runs/``). Any other flag of ``avl-genreplay bench`` passes
through (``--help`` lists them). The data root comes from ``--data-root`` or
``$AVL_GENREPLAY_DATA``; with neither, Avalanche downloads the data.
"""

import sys
from pathlib import Path

from avl_genreplay.bench.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    benchmark, *rest = sys.argv[1:]
    if "--output" not in rest:
        rest += ["--output", str(RESULTS)]
    sys.exit(main(["bench", "--benchmark", benchmark, *rest]))
