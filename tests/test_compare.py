"""``tekfax-compare`` end to end on digits: outputs, seeds, resume, grid, flags and errors.

The runs are tiny (1-2 epochs of 11 steps) and share compiled steps within the process.
"""

import csv
import dataclasses
import functools
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from tekfax.experiments import checkpoint, optimizers, report
from tekfax.experiments import train as train_module
from tekfax.experiments.compare import build_parser, main
from tekfax.experiments.data import load_dataset
from tekfax.experiments.models import create_model, init_variables
from tekfax.experiments.progress import ProgressBar
from tekfax.experiments.train import TIMING_FIELDS, ResumeError, RunConfig, train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECORD_KEYS = {
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "learning_rate",
    "epoch_seconds",
    "eval_seconds",
    "cumulative_seconds",
    "images_per_second",
    "skipped_steps",
}
TEKFAC = ["--lr", "tekfac=0.03", "--damping", "0.3"]
CNN = ["--model", "cnn"]  # the tool's default model is the auto-encoder
README = pathlib.Path(__file__).parent.parent / "README.md"
WARNING = re.compile(r"^tekfax-compare: (warning: .*)$", re.M)


def _compare(out: pathlib.Path, *flags: str, plots: bool = False) -> dict:
    """The tool's results.json; without the plots (a few seconds each) unless ``plots``."""
    assert main(["--output", str(out), *flags, *([] if plots else ["--no-plots"])]) == 0
    assert any(out.glob("curves_*.png")) == plots
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """sgdm and tekfac, 2 epochs, 2 seeds, on digits + cnn."""
    out = tmp_path_factory.mktemp("compare") / "two_seeds"
    flags = [*CNN, "--optimizers", "sgdm", "tekfac", "--epochs", "2", "--seeds", "2", *TEKFAC]
    return out, _compare(out, *flags, "--target-accuracy", "50", plots=True)


def test_results_json_schema_and_config_echo(two_seeds):
    _, results = two_seeds
    assert results["schema_version"] == 1 and results["complete"] is True
    config = results["config"]
    assert config["model"] == "cnn" and config["dataset"] == "digits"
    assert config["optimizers"] == ["sgdm", "tekfac"]
    assert config["epochs"] == 2 and config["seeds"] == 2 and config["batch_size"] == 128
    assert config["target_accuracy"] == 0.5
    assert config["hyperparameters"]["tekfac"] == {
        **optimizers.DEFAULTS["tekfac"],
        "learning_rate": 0.03,
        "damping": 0.3,
    }
    assert config["hyperparameters"]["sgdm"] == optimizers.DEFAULTS["sgdm"]
    env = results["environment"]
    assert set(env["versions"]) == {"jax", "jaxlib", "flax", "optax", "tekfax", "numpy"}
    assert all(env["versions"].values())
    assert env["device"]["platform"] == "cpu" and env["python"].startswith("3.")
    assert results["dataset"]["num_train"] == 1437 and results["grid"] is None
    runs = results["runs"]
    assert [(r["optimizer"], r["seed"]) for r in runs] == [
        ("sgdm", 0),
        ("sgdm", 1),
        ("tekfac", 0),
        ("tekfac", 1),
    ]
    for run in runs:
        assert run["hyperparameters"] == config["hyperparameters"][run["optimizer"]]
        assert [r["epoch"] for r in run["records"]] == [1, 2]
        for record in run["records"]:
            assert set(record) == RECORD_KEYS
            assert 0.0 <= record["test_accuracy"] <= 1.0 and record["train_loss"] > 0
            assert record["epoch_seconds"] > 0 and record["images_per_second"] > 0
        assert run["records"][1]["cumulative_seconds"] == pytest.approx(
            sum(r["epoch_seconds"] for r in run["records"])
        )
        assert run["records"][-1]["test_accuracy"] > 0.5  # both learn
        # healthy: no skipped step, no divergence, no warning
        assert run["skipped_steps"] == 0 and run["steps"] == 22 and run["warning"] is None
        assert not run["diverged"] and run["diverged_epoch"] is None
        assert run["initial_loss"] == pytest.approx(math.log(10), rel=0.2)
    assert runs[0]["records"] != runs[1]["records"]  # seeds differ
    assert results["warnings"] == [] and "Notes:" not in results["table"]


def test_seeds_give_mean_and_std(two_seeds):
    out, results = two_seeds
    for name in ("sgdm", "tekfac"):
        finals = [
            r["records"][-1]["test_accuracy"] for r in results["runs"] if r["optimizer"] == name
        ]
        entry = results["summary"][name]
        assert entry["seeds"] == 2 and entry["final"] == finals
        assert entry["mean"] == pytest.approx(np.mean(finals))
        assert entry["std"] == pytest.approx(np.std(finals, ddof=1))
        row = f"{100 * np.mean(finals):.2f} ± {100 * np.std(finals, ddof=1):.2f}"
        assert row in (out / "table.md").read_text()


def test_csv_table_and_plots(two_seeds, capsys):
    out, results = two_seeds
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2
    assert {(r["optimizer"], r["seed"], r["epoch"]) for r in rows} == {
        (n, str(s), str(e)) for n in ("sgdm", "tekfac") for s in (0, 1) for e in (1, 2)
    }
    first = results["runs"][0]["records"][0]
    assert float(rows[0]["test_accuracy"]) == first["test_accuracy"]
    for name in ("curves_epoch.png", "curves_seconds.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    table = (out / "table.md").read_text()
    assert table == results["table"]
    assert "| data | model | SGDM | TEKFAC |" in table
    assert re.search(r"^\| digits \| cnn \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \|$", table, re.M)
    header = "| optimizer | test accuracy (%) | time / epoch (s) | epochs to 50% | seconds to 50% |"
    assert header in table
    for name in ("SGDM", "TEKFAC"):  # every seed reaches 50% by epoch 2
        row = re.search(rf"^\| {name} \| .* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", table, re.M)
        assert row and 0 < float(row[1]) and 1 <= float(row[2]) <= 2 and float(row[3]) > 0


def test_resume_is_bit_for_bit(two_seeds, tmp_path, capsys):
    reference, _ = two_seeds
    out = tmp_path / "resumed"
    flags = [*CNN, "--optimizers", "tekfac", "--seeds", "2", *TEKFAC]
    first = _compare(out, *flags, "--epochs", "1")
    assert [len(r["records"]) for r in first["runs"]] == [1, 1]
    resumed = _compare(out, *flags, "--epochs", "2", "--resume")
    for seed, run in enumerate(resumed["runs"]):
        assert run["resumed_from_epoch"] == 1
        assert run["records"][0] == first["runs"][seed]["records"][0]  # timing kept too
        # orbax checkpoints, one folder per run
        expected = checkpoint.read(reference / "checkpoints" / f"tekfac-seed{seed}")
        got = checkpoint.read(out / "checkpoints" / f"tekfac-seed{seed}")
        strip = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in got["records"]]
        assert strip == [
            {k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in expected["records"]
        ]
        assert got["epoch"] == expected["epoch"] == 2 and got["step"] == expected["step"]
        for part in ("params", "opt_state"):
            a, b = got[part], expected[part]
            leaves_a = a if isinstance(a, list) else list(_leaves(a))
            leaves_b = b if isinstance(b, list) else list(_leaves(b))
            assert len(leaves_a) == len(leaves_b) > 0
            for x, y in zip(leaves_a, leaves_b, strict=True):
                assert x.dtype == y.dtype and np.array_equal(x, y)  # bit-for-bit
    # A changed setting is refused rather than silently mixed into the old runs.
    with pytest.raises(SystemExit) as err:
        main(["--output", str(out), *flags, "--epochs", "2", "--resume", "--batch-size", "64"])
    assert err.value.code == 2 and "batch_size" in capsys.readouterr().err


def test_train_resumes_from_its_orbax_checkpoint_bit_for_bit(tmp_path):
    """train() directly: 2 epochs in one go equal 1 epoch, then a resume to 2 epochs."""
    dataset = load_dataset("digits")
    hparams = {**optimizers.DEFAULTS["kfac"], "eigen_every": 3}
    config = RunConfig("mlp", "kfac", hparams, seed=5, epochs=2)
    whole = train(config, dataset, progress=False)
    path = tmp_path / "kfac-seed5"
    one = dataclasses.replace(config, epochs=1)
    first = train(one, dataset, checkpoint_path=path, progress=False)
    assert checkpoint.exists(path) and first.resumed_from_epoch == 0
    resumed = train(config, dataset, checkpoint_path=path, resume=True, progress=False)
    assert resumed.resumed_from_epoch == 1 and checkpoint.read(path)["epoch"] == 2
    for got, want in ((resumed.params, whole.params), (resumed.opt_state, whole.opt_state)):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)  # bit-for-bit

    def untimed(records):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]

    assert untimed(resumed.records) == untimed(whole.records)
    assert resumed.records[0] == first.records[0]  # the first epoch's record, timing too
    # A checkpoint resumes only its own run, and never past the requested epochs.
    for other, message in (
        (dataclasses.replace(config, seed=6), "belongs to another run"),
        (dataclasses.replace(config, epochs=1), "past --epochs 1"),
    ):
        with pytest.raises(ResumeError, match=message):
            train(other, dataset, checkpoint_path=path, resume=True, progress=False)


def test_checkpoints_after_the_last_epoch_and_at_most_once_a_minute(tmp_path, monkeypatch):
    """train() saves when CHECKPOINT_SECONDS have passed since the last save, and always
    after the last epoch; checkpoint_seconds=0 saves after every epoch."""
    assert train_module.CHECKPOINT_SECONDS == 60.0
    saved = []
    original = train_module._save
    monkeypatch.setattr(train_module, "_save", lambda *a: (saved.append(a[-1].epoch), original(*a)))
    # No wall clock in the test: the default interval is made infinite, so only the last
    # epoch is due, however slow the machine.
    monkeypatch.setattr(train_module, "CHECKPOINT_SECONDS", math.inf)
    dataset = load_dataset("digits")
    config = RunConfig("mlp", "sgdm", dict(optimizers.DEFAULTS["sgdm"]), seed=0, epochs=3)
    train(config, dataset, checkpoint_path=tmp_path / "default", progress=False)
    assert saved == [3]
    assert checkpoint.read(tmp_path / "default")["epoch"] == 3
    saved.clear()
    every = tmp_path / "every"
    train(config, dataset, checkpoint_path=every, checkpoint_seconds=0, progress=False)
    assert saved == [1, 2, 3] and checkpoint.read(every)["epoch"] == 3


def test_train_step_compiles_with_the_tools_compiler_options(monkeypatch):
    """train() jits its step with step_compiler_options(): an option XLA does not know fails
    that step's compilation and names the option."""
    monkeypatch.setattr(train_module, "_STEPS", {})
    monkeypatch.setattr(train_module, "step_compiler_options", lambda: {"xla_no_such_flag": 1})
    config = RunConfig("mlp", "sgdm", optimizers.DEFAULTS["sgdm"], seed=0, epochs=1)
    with pytest.raises(Exception, match="xla_no_such_flag"):
        train(config, load_dataset("digits"), progress=False)


def test_initial_states_compile_with_the_initialisation_options(monkeypatch):
    """train() jits the initial weights and the optimizer state with the options of
    INIT_OPTIMIZATION_LEVEL: an option XLA does not know fails each of those compilations."""

    def options(level, environ=None):
        return {"xla_no_such_init_flag": 1} if level == train_module.INIT_OPTIMIZATION_LEVEL else {}

    monkeypatch.setattr(train_module, "cpu_compiler_options", options)
    monkeypatch.setattr(train_module, "_PARAM_INITS", {})
    monkeypatch.setattr(train_module, "_OPT_INITS", {})
    dataset = load_dataset("digits")
    config = RunConfig("mlp", "sgdm", optimizers.DEFAULTS["sgdm"], seed=0, epochs=1)
    with pytest.raises(Exception, match="xla_no_such_init_flag"):  # the weights
        train(config, dataset, progress=False)
    model = create_model("mlp", dataset.num_classes, dataset.input_shape)
    weights = jax.jit(functools.partial(init_variables, model, dataset.input_shape))
    train_module._PARAM_INITS[("mlp", dataset.num_classes, dataset.input_shape)] = weights
    with pytest.raises(Exception, match="xla_no_such_init_flag"):  # the optimizer state
        train(config, dataset, progress=False)
    assert list(train_module._PARAM_INITS.values()) == [weights]  # the weights were reused


def _leaves(tree):
    for key in sorted(tree):
        value = tree[key]
        yield from (_leaves(value) if isinstance(value, dict) else [value])


def test_grid_search_writes_results_and_uses_the_selection(tmp_path):
    flags = [*CNN, "--optimizers", "sgdm", "tekfac", "--epochs", "1", "--grid", *TEKFAC]
    flags += ["--grid-lr", "0.01,0.1", "tekfac=0.01,0.03", "--grid-damping", "0.3"]
    results = _compare(tmp_path / "grid", *flags)
    grid = results["grid"]
    assert grid["fraction"] == 0.1 and grid["epochs"] == 1
    assert grid["num_fit"] + grid["num_validation"] == 1437
    for name, lrs in (("sgdm", [0.01, 0.1]), ("tekfac", [0.01, 0.03])):
        entry = grid["optimizers"][name]
        candidates = entry["candidates"]
        assert [c["hyperparameters"]["learning_rate"] for c in candidates] == lrs
        if name == "tekfac":
            assert {c["hyperparameters"]["damping"] for c in candidates} == {0.3}
        accuracies = [c["validation_accuracy"] for c in candidates]
        assert all(len(c["records"]) == 1 and c["phase"] == "grid" for c in candidates)
        assert entry["selected_index"] == int(np.argmax(accuracies))
        selected = candidates[entry["selected_index"]]["hyperparameters"]
        assert entry["selected"] == selected
        assert results["config"]["selected_hyperparameters"][name] == selected
        final = [r for r in results["runs"] if r["optimizer"] == name]
        assert len(final) == 1 and final[0]["hyperparameters"] == selected


def test_default_task_is_the_autoencoder_timed_to_adams_final_loss(tmp_path):
    """With no --target-loss, the loss target is Adam's final test loss (its own epochs)."""
    assert build_parser().parse_args([]).model == "autoencoder"
    results = _compare(tmp_path / "ae", "--optimizers", "sgdm", "adam", "--epochs", "2")
    adam = next(run for run in results["runs"] if run["optimizer"] == "adam")
    target = adam["records"][-1]["test_loss"]
    assert results["summary"]["adam"]["target"] == target
    assert results["summary"]["adam"]["epochs_to_target"] <= 2
    assert f"| epochs to loss {target:.4f} |" in results["table"]


def test_mlp_runs_with_progress_lines(tmp_path, capsys):
    out = tmp_path / "mlp"
    results = _compare(out, "--model", "mlp", "--optimizers", "sgdm", "tekfac", "--epochs", "1")
    captured = capsys.readouterr()
    for name in ("sgdm", "tekfac"):  # not a terminal: one finished line per epoch
        line = rf"^{name} seed 0 epoch 1/1 \[#{{20}}\] 11/11 loss [\d.]+ acc +[\d.]+% [\d,]+ img/s"
        assert len(re.findall(line + r" \| test acc [\d.]+%$", captured.err, re.M)) == 1
    assert "\r" not in captured.err and "| digits | mlp |" in captured.out
    assert "warning" not in captured.err and "Notes:" not in captured.out  # a healthy run
    assert results["config"]["model"] == "mlp"
    assert [len(r["records"]) for r in results["runs"]] == [1, 1]
    assert "| digits | mlp |" in (out / "table.md").read_text()
    assert all(r["records"][0]["test_accuracy"] > 0.5 for r in results["runs"])


def test_progress_bar_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = ProgressBar("kfac seed 0", 2, 5, 4, stream=stream, interval=0.0)
    for done in range(1, 5):
        assert bar.due()
        bar.update(done, 0.5, 0.75, 1000.0)
    bar.close(4, 0.25, 0.875, 2000.0, "test acc 90.00%")
    text = stream.getvalue()
    assert text.count("\r") >= 5 and text.endswith("\n")  # one redraw per update, in place
    assert (
        "kfac seed 0 epoch 2/5 [##########----------] 2/4 loss 0.5000 acc  75.0% 1,000 img/s"
        in text
    )
    final = text.splitlines()[-1].split("\r")[-1].rstrip()
    assert final == (
        "kfac seed 0 epoch 2/5 [####################] 4/4 loss 0.2500 acc  87.5% 2,000 img/s"
        " | test acc 90.00%"
    )


def test_progress_bar_writes_one_line_to_a_log():
    stream = io.StringIO()  # not a terminal: no redraws, only the finished line
    bar = ProgressBar("kfac seed 0", 1, 1, 4, stream=stream, interval=0.0)
    assert not bar.due()
    bar.update(2, 0.5, 0.75, 1000.0)
    bar.close(4, 0.25, None, 2000.0, "test loss 0.1000", skipped=3)
    assert stream.getvalue() == (
        "kfac seed 0 epoch 1/1 [####################] 4/4 loss 0.2500 2,000 img/s 3 skipped"
        " | test loss 0.1000\n"
    )


def test_flag_parsing():
    everyone, named = optimizers.parse_assignments(
        ["0.05", "kfac=0.1", "adam=1e-3"], float, optimizers.OPTIMIZERS, "lr"
    )
    assert everyone == 0.05 and named == {"kfac": 0.1, "adam": 1e-3}
    hp = optimizers.resolve(
        ["sgdm", "adam", "kfac", "tkfac-new"],
        {"lr": ["0.05", "adam=1e-3"], "damping": ["kfac=0.2"], "nu": ["0.1"], "eigen-every": ["5"]},
    )
    assert [hp[n]["learning_rate"] for n in hp] == [0.05, 1e-3, 0.05, 0.05]
    assert hp["kfac"]["damping"] == 0.2 and "nu" not in hp["kfac"]  # bare nu: tkfac-new only
    assert hp["tkfac-new"]["nu"] == 0.1 and "damping" not in hp["tkfac-new"]
    assert hp["kfac"]["eigen_every"] == 5 and "eigen_every" not in hp["sgdm"]
    assert optimizers.resolve(["tekfac"], {"nu": ["tekfac=0.01"]})["tekfac"]["nu"] == 0.01
    hp = optimizers.resolve(["adam", "kfac", "tekfac"], {"norm-constraint": ["0.01", "kfac=0.1"]})
    assert (hp["kfac"]["norm_constraint"], hp["tekfac"]["norm_constraint"]) == (0.1, 0.01)
    assert "norm_constraint" not in hp["adam"]  # a bare value sets the Kronecker ones only
    bad = [
        {"norm-constraint": ["adam=0.1"]},  # adam has no trust region
        {"norm-constraint": ["-1"]},
        {"damping": ["adam=0.1"]},  # adam has no damping
        {"lr": ["nope=0.1"]},  # unknown optimizer
        {"lr": ["0.1", "0.2"]},  # two values for all
        {"lr": ["kfac=fast"]},  # not a number
        {"fisher": ["kfac=exact"]},
        {"eigen-every": ["0"]},
    ]
    for overrides in bad:
        with pytest.raises(optimizers.HyperparameterError):
            optimizers.resolve(["adam", "kfac"], overrides)
    assert optimizers.parse_grid_values(["0.1,0.3", "kfac=1e-3"], "grid-lr") == (
        [0.1, 0.3],
        {"kfac": [1e-3]},
    )
    assert optimizers.step_boundaries(20, 11, 60) == {220: 0.1, 440: 0.1}
    assert math.isclose(optimizers.learning_rate_at(0.1, 440, {220: 0.1, 440: 0.1}), 1e-3)


def test_norm_constraint_flag_reaches_the_optimizer_as_a_traced_value():
    """The tool's kappa, passed into the jitted step as an array, equals the preset's."""
    import flax.linen
    import jax.numpy as jnp
    import optax

    import tekfax

    model = flax.linen.Dense(2)
    x = jnp.arange(12.0).reshape(4, 3) / 10
    params = model.init(jax.random.key(0), x)["params"]
    out = tekfax.loss_and_curvature(
        lambda p: model.apply({"params": p}, x),
        params,
        jnp.array([0, 1, 1, 0]),
        rng=jax.random.key(0),
    )
    hp = optimizers.resolve(["kfac"], {"norm-constraint": ["1e-12"], "lr": ["0.1"]})["kfac"]
    numeric, static = optimizers.split(hp)

    @jax.jit
    def tool_update(numeric):
        opt = optimizers.make_optimizer("kfac", numeric, static, {})
        return opt.update(out.grads, opt.init(params), params, stats=out.stats)[0]

    @functools.partial(jax.jit, static_argnums=0)  # compiled like the tool's: same rounding
    def preset_update(kappa):
        opt = tekfax.kfac(0.1, norm_constraint=kappa)
        return opt.update(out.grads, opt.init(params), params, stats=out.stats)[0]

    got = tool_update(jax.tree.map(jnp.asarray, numeric))
    np.testing.assert_allclose(got["kernel"], preset_update(1e-12)["kernel"])
    clipped, free = optax.tree.norm(got), optax.tree.norm(preset_update(1.0))
    assert float(clipped) < 0.5 * float(free)  # kappa 1e-12 binds where kappa 1 does not


def test_weight_decay_flag_preconditions_the_decayed_gradient():
    """--weight-decay wd: the Kronecker update of g + wd * params (traced), for every
    optimizer; zero leaves the optimizer as it was; a negative value is refused."""
    import flax.linen
    import jax.numpy as jnp
    import optax

    import tekfax

    model = flax.linen.Dense(2)
    x = jnp.arange(12.0).reshape(4, 3) / 10
    params = model.init(jax.random.key(0), x)["params"]
    out = tekfax.loss_and_curvature(
        lambda p: model.apply({"params": p}, x), params, jnp.array([0, 1, 1, 0]),
        rng=jax.random.key(0),
    )  # fmt: skip
    hp = optimizers.resolve(["adam", "kfac"], {"weight-decay": ["0.5"], "lr": ["0.1"]})
    assert hp["adam"]["weight_decay"] == hp["kfac"]["weight_decay"] == 0.5  # a bare value: all
    numeric, static = optimizers.split(hp["kfac"])

    @jax.jit
    def tool_update(numeric):
        opt = optimizers.make_optimizer("kfac", numeric, static, {})
        return opt.update(out.grads, opt.init(params), params, stats=out.stats)[0]

    preset = tekfax.kfac(0.1)

    @jax.jit  # compiled like the tool's: the same rounding
    def preset_update(grads):
        return preset.update(grads, preset.init(params), params, stats=out.stats)[0]

    want = preset_update(jax.tree.map(lambda g, p: g + 0.5 * p, out.grads, params))
    got = tool_update(jax.tree.map(jnp.asarray, numeric))
    np.testing.assert_allclose(got["kernel"], want["kernel"], rtol=1e-6)
    plain = preset_update(out.grads)
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, got, plain))) > 1e-3

    zero = optimizers.resolve(["kfac"], {})["kfac"]
    assert zero["weight_decay"] == 0.0 and "weight_decay" not in optimizers.split(zero)[0]
    with pytest.raises(optimizers.HyperparameterError, match="weight_decay"):
        optimizers.resolve(["kfac"], {"weight-decay": ["-0.1"]})


def test_persistent_compilation_cache_is_the_tools_own_and_can_be_turned_off(tmp_path):
    """The tool stores compiled programs under $TEKFAX_COMPILATION_CACHE; "off" stores none,
    and a cache JAX was given (JAX_COMPILATION_CACHE_DIR) is kept."""
    script = (
        "import jax\n"
        "from tekfax.experiments.compare import persistent_compilation_cache\n"
        "persistent_compilation_cache()\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "print(jax.jit(lambda v: v * 2 + 1)(jax.numpy.arange(3.0)).tolist())\n"
        "print(jax.config.jax_compilation_cache_dir)\n"
    )

    # Without the suite's own JAX cache (tests/conftest.py), as a user's shell would be.
    ours = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}

    def run(**env):
        done = subprocess.run(
            [sys.executable, "-c", script],
            env={**ours, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.splitlines()

    cache = tmp_path / "cache"
    first = run(TEKFAX_COMPILATION_CACHE=str(cache))
    assert first == ["[1.0, 3.0, 5.0]", str(cache)] and any(cache.iterdir())
    assert run(TEKFAX_COMPILATION_CACHE=str(cache)) == first  # served from the cache
    assert run(TEKFAX_COMPILATION_CACHE="off")[1] == "None"
    theirs = str(tmp_path / "theirs")
    assert run(TEKFAX_COMPILATION_CACHE=str(cache), JAX_COMPILATION_CACHE_DIR=theirs)[1] == theirs


def test_summary_with_a_diverged_seed_and_partial_targets():
    def run(seed, accuracies, diverged=False):
        records = [
            {
                "epoch": e + 1,
                "test_accuracy": a,
                "epoch_seconds": 0.5,
                "cumulative_seconds": 0.5 * (e + 1),
            }
            for e, a in enumerate(accuracies)
        ]
        return {"optimizer": "kfac", "seed": seed, "records": records, "diverged": diverged}

    runs = [run(0, [0.8, 0.96]), run(1, [0.9, 0.92]), run(2, [0.3, math.nan], diverged=True)]
    entry = report.summarize(runs, ["kfac"], True, 0.95)["kfac"]
    assert entry["seeds"] == 3 and entry["diverged"] == 1 and entry["reached"] == 1
    assert entry["mean"] == pytest.approx(0.94) and entry["std"] == pytest.approx(0.0282842712)
    assert entry["epochs_to_target"] == 2 and entry["seconds_to_target"] == 1.0
    table = report.format_table(
        {"kfac": entry},
        dataset="digits",
        model="cnn",
        epochs=2,
        batch_size=128,
        classification=True,
        target=0.95,
    )
    assert "| KFAC | 94.00 ± 2.83 (1 diverged) | 0.500 | 2.0 (1/3) | 1.00 (1/3) |" in table
    json.dumps(report.jsonable(runs), allow_nan=False)  # NaN becomes null


def test_bad_flags_exit_with_usage(tmp_path, capsys):
    for flags, message in (
        (["--damping", "adam=0.1"], "adam has no damping"),
        (["--optimizers", "sgd"], "unknown optimizer 'sgd'"),
        (["--resume"], "--resume needs --output"),
    ):
        with pytest.raises(SystemExit) as err:
            main(["--output", str(tmp_path / "x"), *flags] if flags != ["--resume"] else flags)
        assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_dataset_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tekfax.experiments", "--dataset", "cifar10"]
    command += ["--data-dir", str(empty), "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--data-dir" in result.stderr and "cifar10" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_single_threaded_lapack_limits_every_blas_library():
    """The tool's BLAS/LAPACK limit reaches SciPy's OpenBLAS, which jax's CPU eigh calls."""
    import jax.numpy as jnp
    from threadpoolctl import threadpool_info, threadpool_limits

    from tekfax.experiments.compare import single_threaded_lapack

    jnp.linalg.eigh(jnp.eye(3))[0].block_until_ready()  # LAPACK loaded
    with threadpool_limits(limits=2, user_api="blas"):
        single_threaded_lapack()
        blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
        assert blas and all(i["num_threads"] == 1 for i in blas)


def _assert_warned(out: pathlib.Path, results: dict, err: str, expected: list[str]) -> None:
    """Each expected warning is on stderr, in results.json and under the table, and no other."""
    assert WARNING.findall(err) == expected
    assert results["warnings"] == expected
    assert [r["warning"] for r in results["runs"] if r["warning"]] == expected
    table = (out / "table.md").read_text()
    assert table.endswith("Notes:\n" + "".join(f"- {line}\n" for line in expected))


def test_a_diverging_run_prints_and_records_a_warning(tmp_path, capsys):
    out = tmp_path / "diverge"
    flags = ["--model", "mlp", "--optimizers", "kfac", "sgdm", "--epochs", "3"]
    results = _compare(out, *flags, "--lr", "1000")  # absurd for both
    err = capsys.readouterr().err
    kfac, sgdm = results["runs"]
    # kfac's trust region (on by default) bounds the step whatever the learning rate
    assert kfac["warning"] is None and not kfac["diverged"]
    assert sgdm["diverged"] and sgdm["diverged_epoch"] == len(sgdm["records"]) < 3
    final = sgdm["records"][-1]["train_loss"]
    assert final is None or final > 10 * sgdm["initial_loss"]  # the documented rule
    epoch = sgdm["diverged_epoch"]
    assert re.search(rf"sgdm seed 0 .*diverged at epoch {epoch} of 3 \(training loss", err)
    assert results["summary"]["sgdm"]["diverged"] == 1
    _assert_warned(out, results, err, [sgdm["warning"]])


def _tool_defaults_differing_from_the_library() -> set[str]:
    return {
        key
        for key in (*optimizers.NUMERIC, *optimizers.STATIC)
        for name, defaults in optimizers.DEFAULTS.items()
        if optimizers.is_kronecker(name)
        and key in defaults
        and defaults[key] != optimizers.library_default(key)
    }


def test_readme_and_help_name_every_default_that_differs_from_the_library():
    assert _tool_defaults_differing_from_the_library() == set(optimizers.DIFFERENCES)
    section = README.read_text().split("## Comparing optimizers: `tekfax-compare`")[1]
    section = section.split("\n## ")[0]
    row = re.compile(r"^\| `--([\w-]+)` \| (.*?) \| (.*?) \| (.*?) \|$", re.M)
    rows = {m[1]: (m[2], m[3], m[4]) for m in row.finditer(section)}
    flag_of = {key: flag for flag, (key, _) in optimizers.FLAGS.items()}
    assert set(rows) == {flag_of[key] for key in optimizers.DIFFERENCES}
    for key in optimizers.DIFFERENCES:
        library = optimizers.describe(optimizers.library_default(key))
        why = optimizers.DIFFERENCES[key]
        assert rows[flag_of[key]] == (optimizers.describe_defaults(key), library, why), key
    help_text = re.sub(r"\s", "", build_parser().format_help())
    for key, why in optimizers.DIFFERENCES.items():
        assert re.sub(r"\s", "", why) in help_text, key
    assert optimizers.DEFAULTS["kfac"]["curvature_every"] == 10  # the library's, measured
