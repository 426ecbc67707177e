"""The robustness panel: every optimizer over the learning-rate x damping grid, three tasks.

    python scripts/robustness.py                                  # the full panel
    python scripts/robustness.py --tasks digits-mlp --json panel.json
    python scripts/robustness.py --tasks digits-cnn --steps 200 --optimizers kfac adam
    python scripts/robustness.py --norm-constraint 1e-3 --set eigen_every=20

See tekfax.experiments.robustness.
"""

from tekfax.experiments.robustness import main

if __name__ == "__main__":
    raise SystemExit(main())
