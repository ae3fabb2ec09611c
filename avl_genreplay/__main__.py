"""``python -m avl_genreplay`` is the ``avl-genreplay`` command."""

import sys

from avl_genreplay.bench.cli import main

sys.exit(main())
