"""The README's main job runs and learns; the benchmark script runs; the code base is ruff-clean."""

import doctest
import functools
import importlib.util
import inspect
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tekfax
from tests._formulas import assert_trees_close

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_prints_table_and_learns():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--epochs", "3"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = re.findall(
        r"^\| (\d+) \| ([\d.]+) \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+)% \|$",
        result.stdout,
        re.MULTILINE,
    )
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    tekfac_losses = [float(r[1]) for r in rows]
    adam_losses = [float(r[3]) for r in rows]
    assert tekfac_losses[-1] < tekfac_losses[0]
    assert adam_losses[-1] < adam_losses[0]


def test_ruff_clean():
    paths = [str(ROOT / p) for p in ("tekfax", "tests", "scripts")]
    subprocess.run([sys.executable, "-m", "ruff", "check", *paths], check=True)
    subprocess.run([sys.executable, "-m", "ruff", "format", "--check", *paths], check=True)


# --- scripts/bench.py ----------------------------------------------------------------------

MIB = 2.0**20


@functools.cache
def _script(name: str):
    """scripts/<name>.py as a module (scripts/ is no package; a script may import another)."""
    spec = importlib.util.spec_from_file_location(f"tekfax_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


def _bench():
    return _script("bench")


def _dense_layers(params) -> list[tuple[int, int]]:
    """(d_in with the bias row, d_out) of every Dense kernel, from the parameter shapes."""
    kernels = [v["kernel"].shape for v in params.values()]
    return [(fan_in + 1, fan_out) for fan_in, fan_out in kernels]


def test_bench_smoke_table_floor_and_memory(tmp_path):
    """One tiny run of the CLI: the table prints, and the JSON's floor and state sizes equal
    the formulas of the script's docstring written out for the MLP's layer shapes."""
    batch, out = 16, tmp_path / "bench.json"
    args = ["--models", "mlp", "--batch-sizes", str(batch), "--optimizers", "kfac"]
    args += ["--intervals", "default", "--window", "1", "--warmup", "0", "--matmul-size", "256"]
    args += ["--opt-level", "1"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = re.findall(r"^\| (sgdm|kfac \(default\)) \|(?: [\d.]+x? \|){10}$", result.stdout, re.M)
    assert rows == ["sgdm", "kfac (default)"]
    assert "Floor per step by stage" in result.stdout and "Memory (MiB" in result.stdout
    assert "XLA backend optimisation level 1" in result.stdout
    results = json.loads(out.read_text())
    assert results["compiler_options"] == {"xla_backend_optimization_level": 1}
    steps = results["runs"][0]["steps"]
    sgd, kfac = steps["rows"]
    layers = _dense_layers(_bench().setup("mlp", batch).variables["params"])
    every = {k: inspect.signature(tekfax.kfac).parameters[k].default for k in _bench().DEFAULTS}
    cubes = sum(i**3 + o**3 for i, o in layers)
    expected = {
        "precondition": sum(2 * i * o * (i + o) for i, o in layers),  # cached inverses: 2 products
        "sampled backward": sum(2 * batch * i * o for i, o in layers) / every["curvature_every"],
        "factors": sum(2 * batch * (i * i + o * o) for i, o in layers) / every["curvature_every"],
        "eigh": 9 * cubes / every["eigen_every"],
        "inverses": 2 * cubes / every["eigen_every"],
    }
    floor = kfac["floor_flops"]
    for key, value in expected.items():
        assert floor[key] == pytest.approx(value, rel=1e-12), key
    # XLA's count of the SGD step: the products (3 per layer, less the first layer's input
    # gradient, which is never formed) plus elementwise work, a few percent.
    products = (
        sum(6 * batch * i * o for i, o in layers) - 2 * batch * (layers[0][0] - 1) * layers[0][1]
    )
    assert 0.9 * products <= floor["forward + backward"] <= 1.2 * products
    assert sgd["floor_flops"] == {"forward + backward": floor["forward + backward"]}
    squares = sum(i * i + o * o for i, o in layers) * 4 / MIB
    assert kfac["state_mib"]["factor"] == pytest.approx(squares)
    assert kfac["state_mib"]["q"] == pytest.approx(squares)
    for row in (sgd, kfac):
        m = row["memory"]
        assert m["peak"] == m["argument"] + m["output"] + m["temp"] - m["alias"] > 0
    assert kfac["memory_ratio"] == pytest.approx(kfac["memory"]["peak"] / sgd["memory"]["peak"])
    inputs = batch * sum(i - 1 for i, _ in layers) * 4 / MIB
    assert steps["statistics_mib"]["layer inputs"][0] == pytest.approx(inputs)
    # compiled kernels: SGD's come from no tekfax module, KFAC's from its stages
    assert "Kernels XLA compiles one by one" in result.stdout
    stages = {"curvature", "eigenbasis", "precondition", "guard"}
    assert not set(sgd["kernels"]) & (stages | {"capture"})
    assert stages <= set(kfac["kernels"])
    assert sum(kfac["kernels"].values()) > sum(sgd["kernels"].values())


def test_kernel_sources_counts_every_kernel_by_its_module():
    """Every fusion and library call of a compiled program is counted once, under the tekfax
    module whose code made it: eigh under eigenbasis, the rest under the module it ran in."""
    from tekfax import curvature, eigenbasis

    def fn(x):
        ((values, vectors),) = eigenbasis._eigh_all([x @ x.T])
        return jnp.sin(values).sum(), vectors, curvature.power_of_two(x)  # a fusion of its own

    hlo = jax.jit(fn).lower(jnp.ones((4, 4))).compile().as_text()
    counts = _bench().kernel_sources(hlo)
    kernels = len(re.findall(r" (?:fusion|custom-call)\(", hlo))
    assert sum(counts.values()) == kernels > 0
    assert counts["eigenbasis"] >= 1 and counts["curvature"] >= 1
    assert set(counts) <= {"eigenbasis", "curvature", "model, loss and optax", "unattributed"}


def test_bench_autoencoder_uses_the_models_loss():
    """The auto-encoder's batch is its own target and both steps' losses are the sigmoid
    binary cross-entropy summed over the outputs, against numpy."""
    bench = _bench()
    b = bench.setup("autoencoder", 4)
    x = np.asarray(b.x, np.float64)
    assert b.loss == "sigmoid_binary_cross_entropy" and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(np.asarray(b.y), np.asarray(b.x).reshape(4, -1))
    params = b.variables["params"]
    f = np.asarray(b.model.apply({"params": params}, b.x), np.float64)
    y = x.reshape(4, -1)
    expected = np.mean(np.sum(np.maximum(f, 0) - f * y + np.log1p(np.exp(-np.abs(f))), axis=1))
    entry = bench.optimizers(None, ["default"])["sgdm"]
    copy = bench._copy(params)
    sgd_loss = bench.make_step(b, entry)(copy, {}, entry.opt.init(params), b.x, b.y, None)[-1]
    kronecker_loss = jax.jit(lambda p: bench._capture(b, p, {}, jax.random.key(0), False).loss)
    np.testing.assert_allclose(float(sgd_loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(kronecker_loss(params)), expected, rtol=1e-5)
    dims = bench.layer_dims(bench.stats_shapes(b))
    assert [(d.d_in, d.d_out) for d in dims.values()] == _dense_layers(params)


def test_bench_compiles_every_step_with_the_given_compiler_options():
    """--opt-level reaches the compilation: an option XLA does not know fails and is named."""
    bench = _bench()
    entry = bench.optimizers(None, ["default"])["sgdm"]
    with pytest.raises(Exception, match="xla_no_such_flag"):
        bench.bench_one(bench.setup("mlp", 4), entry, 1, 0, {"xla_no_such_flag": 1})


def test_bench_other_guard_variant_traces_the_other_form():
    """The "other-guard" variant flips :func:`tekfax.guard.skips_under_cond` for its trace."""
    bench = _bench()
    b = bench.setup("mlp", 4)
    entries = bench.optimizers(["kfac"], ["default", "other-guard"])
    own, other = entries["kfac (default)"], entries["kfac (other-guard)"]
    assert own.guard_under_cond is None
    assert other.guard_under_cond is not tekfax.guard.skips_under_cond()

    def conds(entry):
        params = b.variables["params"]
        args = (params, {}, entry.opt.init(params), b.x, b.y, jax.random.key(0))
        return str(jax.make_jaxpr(bench.make_step(b, entry))(*args)).count("cond[")

    extra = 1 if other.guard_under_cond else -1  # the guard's one conditional
    assert conds(other) == conds(own) + extra
    assert tekfax.guard.skips_under_cond() is (jax.default_backend() != "cpu")  # restored


# --- scripts/bench_eigh.py -----------------------------------------------------------------


def test_bench_eigh_prints_one_row_per_size_and_names_the_faster_form():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_eigh.py"), "--sizes", "3", "6"]
        + ["--batch", "3", "--repeats", "2"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert f"BATCHED_EIGH_MAX = {tekfax.eigenbasis.BATCHED_EIGH_MAX}" in result.stdout
    rows = re.findall(
        r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (batched|single calls) \|$",
        result.stdout,
        re.MULTILINE,
    )
    assert [int(r[0]) for r in rows] == [3, 6]
    for _, _, batched, singles, faster in rows:  # equal when rounded: either may be faster
        if float(batched) != float(singles):
            assert faster == ("batched" if float(batched) < float(singles) else "single calls")


# --- scripts/bench_conditional.py ------------------------------------------------------------


def test_bench_conditional_times_each_kernel_in_a_conditional_that_xla_keeps():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_conditional.py"), "--batch", "2"]
        + ["--size", "4", "--channels", "3", "--repeats", "2"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = re.findall(
        r"^\| ([a-z ,0-9x]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$", result.stdout, re.M
    )
    assert [r[0] for r in rows] == [
        "matrix product 1024 x 1024",
        "convolution",
        "convolution, input gradient",
        "convolution, input gradient, tekfax form",
        "convolution, kernel gradient",
    ]
    # What is timed: each kernel's value, and a real conditional whose other branch gives 0.
    bench = _script("bench_conditional")
    for fn, arg in bench.kernels(2, 4, 3).values():
        branched = bench.in_cond(fn)
        # the conditional's kernels round differently: compare at the array's scale
        assert_trees_close(branched((jnp.array(True), arg)), fn(arg), rtol=1e-5)
        assert not np.any(branched((jnp.array(False), arg)))
        text = branched.lower((jnp.array(True), arg)).compile().as_text()
        assert "conditional(" in text


# --- scripts/bench_loop.py -------------------------------------------------------------------


def test_bench_loop_times_the_tools_step_under_each_feed(capsys):
    bench = _script("bench_loop")
    argv = ["--model", "mlp", "--dataset", "digits", "--batch-size", "64"]
    bench.main([*argv, "--optimizers", "adam", "--steps", "2", "--warmup", "1"])
    rows = re.findall(
        r"^\| adam \| ([a-z() ]+) \| ([\d.]+) \| ([\d.]+)x \|$", capsys.readouterr().out, re.M
    )
    assert [r[0] for r in rows] == list(bench.FEEDS)
    assert rows[-1][2] == "1.00"  # the device row is its own reference
    # The feeds differ only in where the arguments live: the same values, steps and indices.
    dataset = bench.load_dataset("digits")
    config = bench.loop.RunConfig("mlp", "adam", bench.optimizers.DEFAULTS["adam"], 0, 1, 64)
    plan = bench.loop._plan(config, dataset)
    orders = bench._orders(len(dataset.x_train), 64, 3)
    fed = [list(bench._steps(kind, plan, dataset, orders)) for kind in bench.FEEDS]
    assert isinstance(fed[0][0][1], np.ndarray) and isinstance(fed[2][0][3], jax.Array)
    for other in fed[1:]:
        for got, want in zip(jax.tree.leaves(other), jax.tree.leaves(fed[0]), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    result = doctest.testmod(bench)
    assert result.attempted > 0 and result.failed == 0


# --- scripts/written_out.py ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "method", "batch", "shape"),
    [("cnn", "tekfac", 576, None), ("autoencoder", "kfac", 32, (8, 8, 1))],
)
def test_written_out_step_is_the_preset(x64, monkeypatch, name, method, batch, shape):
    """The written-out step trains the model exactly as the tekfax preset does.

    Statistics every step and a refresh every other (steps 0 and 2, not 1). For TEKFAC the
    batch (576) exceeds the digits CNN's widest input (Dense_0, 513), so no factor has a
    repeated eigenvalue and both eigenbases, hence S, agree up to signs; KFAC's inverse
    factors do not depend on the basis (the auto-encoder here is the digits-sized one).
    """
    written = _script("written_out")
    bench = written.bench
    if shape is not None:
        monkeypatch.setitem(bench.SHAPES, name, shape)
    b = bench.setup(name, batch)
    variables, x, y = jax.tree.map(
        lambda v: v.astype(jnp.float64) if v.dtype == jnp.float32 else v, (b.variables, b.x, b.y)
    )
    b = b._replace(variables=variables, x=x, y=y)
    every = {"curvature_every": 1, "eigen_every": 2, "rescale_every": 1}
    opt = bench.KRONECKER[method].make(0.01, damping=0.1, **every)
    preset_step = bench.make_step(b, bench.Entry(opt, method, every))  # donates its arguments
    settings = written.Settings(method, every=(1, 2))
    written_step = jax.jit(
        functools.partial(written.written_out_step, written.spec(b.model), settings)
    )
    params = b.variables["params"]
    ours = (jax.tree.map(jnp.copy, params), {}, opt.init(params))
    theirs = (params, {}, written.init(params))
    for i in range(3):
        step_key = jax.random.fold_in(jax.random.key(1), i)
        ours = preset_step(*ours, b.x, b.y, step_key)[:3]
        # tekfax draws the labels with the first of split(rng, num_samples) keys
        theirs = written_step(*theirs, b.x, b.y, jax.random.split(step_key, 1)[0])[:3]
    assert int(theirs[2].count) == 3
    moved = jax.tree.map(lambda a, p: a - p, ours[0], params)
    assert_trees_close(jax.tree.map(lambda a, p: a - p, theirs[0], params), moved, rtol=1e-9)
    assert all(float(jnp.max(jnp.abs(m))) > 1e-5 for m in jax.tree.leaves(moved))


def test_written_out_prints_kernels_compile_steps_and_floors(capsys):
    written = _script("written_out")
    written.main(["--batch", "8", "--repeats", "1", "--steps", "10"])
    number, ratio = r"([\d.]+)", r"([\d.]+)x"
    cells = ["([a-z, ]+)", r"(\d+)", number, ratio, number, ratio, number, ratio]
    pattern = "^" + "".join(rf"\| {c} " for c in cells) + r"\|$"
    rows = re.findall(pattern, capsys.readouterr().out, re.M)
    names = ["sgdm", "tekfac written out", "tekfac written out, bare", "tekfax tekfac"]
    assert [r[0] for r in rows] == names
    assert rows[0][3] == "1.0" and rows[0][5] == "1.00"
    kernels = {r[0]: int(r[1]) for r in rows}
    # The protections add kernels and tekfax's numerics more; SGD needs the fewest.
    assert kernels["sgdm"] < kernels["tekfac written out, bare"] < kernels["tekfac written out"]
    assert kernels["tekfac written out"] < kernels["tekfax tekfac"]
    floors = [float(r[6]) for r in rows]  # SGD's floor, then TEKFAC's for the other three
    assert floors[0] < floors[1] and floors[1] == floors[2] == floors[3]
