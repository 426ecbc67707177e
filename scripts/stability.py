"""Long-run stability grid on digits (README "Long-run stability").

See tekfax.experiments.stability.
"""

from tekfax.experiments.stability import main

if __name__ == "__main__":
    raise SystemExit(main())
