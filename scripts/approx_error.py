"""Approximation-error study (TKFAC paper Figures 1-2) on digits.

See tekfax.experiments.approx_error.
"""

from tekfax.experiments.approx_error import main

if __name__ == "__main__":
    raise SystemExit(main())
