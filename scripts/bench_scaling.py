"""Data-parallel scaling: step time and bytes communicated per step on 1, 2, 4, 8 devices.

One subprocess per device count N, with ``--xla_force_host_platform_device_count=N`` set
before jax is imported (on a GPU/TPU host pass ``--no-force`` to use the real devices). Each
trains TEKFAC (statistics every step) data-parallel on a fixed global batch and reports:

* the mean step time over 10 steps (best of ``--repeats`` windows, against the noise of a
  shared machine) with ``eigen_every=10`` (one refresh per window) and with
  ``eigen_every=1`` (a refresh every step), the latter also with ``eigen_mesh``;
* the bytes all-reduced per statistics step, from the model (factors sum_l 4 (d_in^2 +
  d_out^2), gradients, and for TEKFAC S sum_l 4 d_in d_out) and, as a cross-check, summed
  over the ``all-reduce`` ops of the compiled HLO (each op counted once, as written).

    python scripts/bench_scaling.py [--model cnn] [--batch-size 256] [--repeats 5]

Forced host devices share the machine's CPU cores, so on a CPU the time column shows the
overhead of sharding, not a speedup.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

DEVICE_COUNTS = (1, 2, 4, 8)
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}
_BYTES.update({"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8})


def collective_bytes(hlo: str, op: str) -> int:
    """Bytes of the results of every ``op`` (e.g. all-reduce) in compiled HLO text."""
    total = 0
    for line in hlo.splitlines():
        if f" {op}(" not in line and f" {op}-start(" not in line:
            continue
        result = line.split("=", 1)[1].split(f" {op}")[0]
        for dtype, dims in _SHAPE.findall(result):
            total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def child(args: argparse.Namespace) -> None:
    import jax
    import numpy as np
    import optax

    import tekfax
    from tekfax.capture import iter_layer_stats
    from tekfax.experiments import models

    input_shape = (8, 8, 1) if args.model in ("mlp", "cnn") else (32, 32, 3)
    model = models.create_model(args.model, 10, input_shape)
    variables = models.init_variables(model, input_shape, jax.random.key(0))
    params = variables["params"]
    mesh = tekfax.sharding.data_mesh()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, *input_shape)).astype(np.float32)
    y = rng.integers(0, 10, args.batch_size).astype(np.int32)

    def make_step(opt):
        @jax.jit
        def step(params, opt_state, x, y, key):
            out = tekfax.loss_and_curvature(
                lambda p: model.apply({"params": p}, x, train=True),
                params,
                y,
                rng=key,
                compute_stats=tekfax.stats_needed(opt_state),
            )
            updates, opt_state = opt.update(out.grads, opt_state, params, stats=out.stats)
            return optax.apply_updates(params, updates), opt_state, out.loss

        return step

    def run(eigen_every: int, eigen_mesh) -> dict:
        opt = tekfax.tekfac(
            0.01,
            damping=0.1,
            curvature_every=1,
            rescale_every=1,
            eigen_every=eigen_every,
            eigen_mesh=eigen_mesh,
        )
        p, s, key = tekfax.sharding.replicate(mesh, (params, opt.init(params), jax.random.key(1)))
        xs, ys = tekfax.sharding.shard_batch(mesh, (x, y))
        compiled = make_step(opt).lower(p, s, xs, ys, key).compile()
        hlo = compiled.as_text()
        for i in range(3):  # warm-up
            p, s, _ = compiled(p, s, xs, ys, jax.random.fold_in(key, i))
        jax.block_until_ready(p)
        windows = []  # the best of --repeats windows of 10 steps (one refresh each)
        for _ in range(args.repeats):
            tic = time.perf_counter()
            for i in range(10):
                p, s, loss = compiled(p, s, xs, ys, jax.random.fold_in(key, i))
            jax.block_until_ready(loss)
            windows.append((time.perf_counter() - tic) / 10)
        return {
            "ms": 1e3 * min(windows),
            "all_reduce_bytes": collective_bytes(hlo, "all-reduce"),
            "collective_bytes": collective_bytes(hlo, "all-reduce")
            + collective_bytes(hlo, "all-gather"),
        }

    stats = jax.eval_shape(
        lambda p: (
            tekfax.loss_and_curvature(
                lambda q: model.apply({"params": q}, x, train=True), p, y, rng=jax.random.key(0)
            ).stats
        ),
        params,
    )
    layers, factor_bytes, rescale_bytes = {}, {}, 0
    for name, st in iter_layer_stats(stats):
        d_in, d_out = st.meta.d_in, st.meta.d_out
        layers[name] = (d_in, d_out)
        # One all-reduce per statistic: the streamed chunks are summed per device first.
        factor_bytes[name] = 4 * (d_in * d_in + d_out * d_out)
        rescale_bytes += 4 * d_in * d_out
    result = {
        "devices": jax.device_count(),
        "layers": layers,
        "factor_bytes": factor_bytes,
        "grad_bytes": 4 * sum(v.size for v in jax.tree_util.tree_leaves(params)),
        "rescale_bytes": rescale_bytes,
        "amortised": run(10, None),
        "refresh": run(1, None),
        "refresh_eigen_mesh": run(1, mesh),
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn", choices=["mlp", "cnn", "resnet20", "vgg16"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed windows of 10 steps; the best counts"
    )
    parser.add_argument("--devices", type=int, nargs="+", default=list(DEVICE_COUNTS))
    parser.add_argument("--no-force", dest="force", action="store_false")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = []
    for count in args.devices:
        env = dict(os.environ)
        if args.force:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
            env["JAX_PLATFORMS"] = "cpu"
        command = [sys.executable, __file__, "--child", "--model", args.model]
        command += ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print_tables(args, results)


def print_tables(args: argparse.Namespace, results: list[dict]) -> None:
    first = results[0]
    print(f"### {args.model}, TEKFAC, global batch {args.batch_size}, statistics every step\n")
    print("| layer | d_in | d_out | factor all-reduce per statistics step (bytes) |")
    print("|---|---|---|---|")
    for name, (d_in, d_out) in first["layers"].items():
        print(f"| {name} | {d_in} | {d_out} | {first['factor_bytes'][name]:,} |")
    factors = sum(first["factor_bytes"].values())
    model = factors + first["grad_bytes"] + first["rescale_bytes"]
    print(
        f"\nPer statistics step: factors {factors:,} B + gradients {first['grad_bytes']:,} B "
        f"+ TEKFAC S {first['rescale_bytes']:,} B = {model:,} B, whatever the device count.\n"
    )
    print(
        "| devices | step (ms), eigen_every=10 | step (ms), eigh every step | same, "
        "eigen_mesh | all-reduce bytes in HLO | extra collective bytes in HLO (eigen_mesh) |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        mesh_bytes = r["refresh_eigen_mesh"]["collective_bytes"]
        print(
            f"| {r['devices']} | {r['amortised']['ms']:.1f} | {r['refresh']['ms']:.1f} | "
            f"{r['refresh_eigen_mesh']['ms']:.1f} | {r['amortised']['all_reduce_bytes']:,} | "
            f"{mesh_bytes - r['refresh']['collective_bytes']:,} |"
        )


if __name__ == "__main__":
    main()
