"""Runs one of the package's benchmark comparisons and writes its results
beside this script, in ``benchmarks/results/``.

Usage (from anywhere)::

    python benchmarks/run_benchmark.py splitmnist          # all strategies, 3 seeds
    python benchmarks/run_benchmark.py splitfmnist --seeds 0
    python benchmarks/run_benchmark.py splitmnist --quick  # about two minutes

Any other flag of ``avl-genreplay bench`` passes through (``--help`` lists
them). The data root comes from ``--data-root`` or ``$AVL_GENREPLAY_DATA``;
with neither, Avalanche downloads the data.
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
