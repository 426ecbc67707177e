"""Approximation-error study: the TKFAC paper's Figures 1 and 2 on scikit-learn's digits.

An MLP 64-20-20-20-10 (tanh) trains with TKFAC. Every ``every`` iterations, on that step's
batch and with the same sampled labels, it compares each layer's exact Fisher block (from
per-example gradients, :func:`tekfax.diagnostics.exact_fisher_blocks`) with the blocks that
KFAC, EKFAC, TKFAC and TEKFAC estimate from the same batch (a fresh state updated once, with
``rescale_ema=0``, so every estimate is exactly that batch's), and records the Frobenius
errors |F - F_approx|_F. For Dense layers F1 = F, so the TKFAC trace identity and Theorem 3.1
predict err(TEKFAC) <= err(TKFAC) and err(EKFAC) <= err(KFAC) at every checkpoint.

    python scripts/approx_error.py [--iterations 300] [--every 30] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tekfax
from tekfax.capture import flatten_by_name
from tekfax.experiments.data import iterate_batches, load_dataset

METHODS = {
    "KFAC": tekfax.scale_by_kfac,
    "EKFAC": tekfax.scale_by_ekfac,
    "TKFAC": tekfax.scale_by_tkfac,
    "TEKFAC": tekfax.scale_by_tekfac,
}


HEATMAP_SIZE = 200


class ErrorStudyMLP(nn.Module):
    """64-20-20-20-10 with tanh, as in the TKFAC paper's approximation-error figures."""

    hidden: Sequence[int] = (20, 20, 20)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = jnp.tanh(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def batch_errors(logits_fn, params, y, rng, damping: float) -> tuple[dict, dict, dict]:
    """Per-layer Frobenius errors of every method on one batch, and the blocks of TKFAC.

    Returns (errors {method: {layer: scalar}}, exact blocks, TKFAC blocks), flat by layer
    name; jit-compatible.
    """
    out = tekfax.loss_and_curvature(logits_fn, params, y, rng=rng)
    exact = tekfax.diagnostics.exact_fisher_blocks(logits_fn, params, y, rng=rng)
    errors, tkfac_blocks = {}, {}
    for name, make in METHODS.items():
        opt = make(damping=damping, rescale_ema=0.0)
        _, state = opt.update(out.grads, opt.init(params), params, stats=out.stats)
        errs = tekfax.diagnostics.approximation_errors(state, exact)
        errors[name] = flatten_by_name(errs)
        if name == "TKFAC":
            tkfac_blocks = flatten_by_name(tekfax.diagnostics.approx_fisher_blocks(state))
    return errors, flatten_by_name(exact), tkfac_blocks


def run(
    iterations: int = 300,
    every: int = 30,
    batch_size: int = 128,
    learning_rate: float = 0.05,
    damping: float = 0.1,
    seed: int = 0,
) -> dict:
    """Trains with TKFAC and measures the errors every ``every`` iterations.

    Returns a dict with ``iterations`` (list), ``errors`` ({method: {layer: [per checkpoint]}}),
    and the first layer's ``F``, ``F_TKFAC`` (NumPy) at the last checkpoint.
    """
    data = load_dataset("digits")
    model = ErrorStudyMLP()
    params = model.init(jax.random.key(seed), data.x_train[:1])["params"]
    opt = tekfax.tkfac(learning_rate, damping=damping, eigen_every=10)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y, rng):
        out = tekfax.loss_and_curvature(lambda p: model.apply({"params": p}, x), params, y, rng=rng)
        updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def measure(params, x, y, rng):
        return batch_errors(lambda p: model.apply({"params": p}, x), params, y, rng, damping)

    history = {"iterations": [], "errors": {m: {} for m in METHODS}}
    key = jax.random.key(seed + 1)
    rng = np.random.default_rng(seed)
    it = 0
    first_layer = None
    while it <= iterations:
        for x, y in iterate_batches(data.x_train, data.y_train, batch_size, rng, augment=False):
            if it > iterations:
                break
            sub = jax.random.fold_in(key, it)
            if it % every == 0:
                errors, exact, approx = measure(params, x, y, sub)
                history["iterations"].append(it)
                for method, layers in errors.items():
                    for layer, value in layers.items():
                        history["errors"][method].setdefault(layer, []).append(float(value))
                first_layer = min(exact)
                history["F"] = np.asarray(exact[first_layer])
                history["F_TKFAC"] = np.asarray(approx[first_layer])
            params, opt_state = step(params, opt_state, x, y, sub)
            it += 1
    history["first_layer"] = first_layer
    return history


def summed(history: dict) -> dict[str, list[float]]:
    """Error summed over layers, per method and checkpoint."""
    return {
        m: [float(sum(v)) for v in zip(*layers.values(), strict=True)]
        for m, layers in history["errors"].items()
    }


def format_table(history: dict) -> str:
    """Markdown table: summed error per method at each checkpoint."""
    sums = summed(history)
    lines = ["| iteration | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for i, it in enumerate(history["iterations"]):
        lines.append(f"| {it} | " + " | ".join(f"{sums[m][i]:.4f}" for m in METHODS) + " |")
    return "\n".join(lines)


def plot(history: dict, output: pathlib.Path) -> list[pathlib.Path]:
    """Writes the error curve (Figure 1) and the first layer's heatmaps (Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sums = summed(history)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, values in sums.items():
        ax.plot(history["iterations"], values, marker="o", label=method)
    ax.set_xlabel("iteration")
    ax.set_ylabel("sum over layers of |F - F_approx|_F")
    ax.set_yscale("log")
    ax.set_title("Approximation error, digits MLP 64-20-20-20-10 (TKFAC training)")
    ax.legend()
    fig.tight_layout()
    curve = output / "approx_error.png"
    fig.savefig(curve, dpi=120)
    plt.close(fig)

    # The leading HEATMAP_SIZE rows/columns (bias, then the first input features); colour
    # scale clipped at the 99th percentile of |F| so the off-diagonal structure is visible.
    f, f_tk = (
        history["F"][:HEATMAP_SIZE, :HEATMAP_SIZE],
        history["F_TKFAC"][:HEATMAP_SIZE, :HEATMAP_SIZE],
    )
    panels = {"F": f, "F_TKFAC": f_tk, "|F - F_TKFAC|": np.abs(f - f_tk)}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    vmax = float(np.percentile(np.abs(f), 99))
    for ax, (title, block) in zip(axes, panels.items(), strict=True):
        image = ax.imshow(np.abs(block), cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"{title} ({history['first_layer']})")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="absolute value")
    heatmap = output / "approx_error_heatmaps.png"
    fig.savefig(heatmap, dpi=120)
    plt.close(fig)
    return [curve, heatmap]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--every", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/approx_error")
    args = parser.parse_args(argv)
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    history = run(args.iterations, args.every, args.batch_size, args.lr, args.damping, args.seed)
    table = format_table(history)
    figures = plot(history, output)
    (output / "table.md").write_text(table + "\n")
    payload = {k: v for k, v in history.items() if k not in ("F", "F_TKFAC")}
    (output / "errors.json").write_text(json.dumps(payload, indent=1))
    print(table)
    print("wrote " + ", ".join(str(p) for p in figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
