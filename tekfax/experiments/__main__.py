"""``python -m tekfax.experiments``: the ``tekfax-compare`` command line."""

from tekfax.experiments.compare import main

raise SystemExit(main())
