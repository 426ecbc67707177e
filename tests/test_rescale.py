"""Tests for tekfax.rescale: the eigenvalue-corrected diagonal S (docs/algorithms.md, s. 2-3).

With ``rescale_ema=0`` the S the optimizer holds after an update is the batch S, and is
compared with the exact Fisher of tests/reference.py (per-example gradients):
sum(S) = tr F, S = diag(Q^T F Q), and hence Theorem 3.1. S is held in kernel layout
(d_in, d_out), whose row-major ravel is the ordering of ``np.kron(q_in, q_out)``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tekfax
from tekfax import curvature, patches, rescale
from tekfax.diagnostics import exact_fisher_blocks
from tests import _formulas as fm
from tests.conftest import jit

f64 = pytest.mark.usefixtures("x64")
RTOL = 1e-10


def _diag_in_basis(layer, block: np.ndarray) -> np.ndarray:
    """diag(Q^T F Q) with Q = Q_in (x) Q_out, reshaped to kernel layout (d_in, d_out)."""
    q = np.kron(np.asarray(layer.q_in, np.float64), np.asarray(layer.q_out, np.float64))
    return np.einsum("pi,pq,qi->i", q, block, q).reshape(layer.rescale.shape)


def _s_exact(a: np.ndarray, u: np.ndarray, q_in, q_out) -> np.ndarray:
    """S = E_n[(Q_in^T gradW_n^T Q_out)^2], gradW_n^T = sum_t a_t u_t^T, brute force."""
    q_in, q_out = np.asarray(q_in, np.float64), np.asarray(q_out, np.float64)
    s, n = u.shape[:2]
    total = 0.0
    for k in range(s):
        for i in range(n):
            grad_t = a[i].T @ u[k, i]  # (d_in, d_out): sum over positions
            total = total + (q_in.T @ grad_t @ q_out) ** 2
    return total / (s * n)


def _s_batch(layer, a: np.ndarray, u: np.ndarray) -> np.ndarray:
    return _s_exact(a, u, layer.q_in, layer.q_out)


@f64
@pytest.mark.parametrize("name", list(fm.ZOO_LAYERS))
@pytest.mark.parametrize("preset", ["ekfac", "tekfac"])
def test_s_is_diagonal_of_exact_fisher_in_eigenbasis(preset, name):
    """sum(S) = tr F and S = diag(Q^T F Q), F from per-example gradients (rescale_ema=0)."""
    state, _, out = fm.one_update("zoo", preset)
    layer = state.layers[name]
    exact = fm.exact_fisher("zoo")[name]
    s = np.asarray(layer.rescale)
    assert s.shape == (layer.q_in.shape[0], layer.q_out.shape[0])
    fm.assert_close(np.sum(s), np.trace(exact), RTOL)
    fm.assert_close(s, _diag_in_basis(layer, exact), RTOL)
    fm.assert_close(s, _s_batch(layer, *fm.layer_mats(fm.flat(out.stats)[name])), RTOL)
    # The approximate block is Q diag(S) Q^T, in ravel_pytree ordering.
    block = fm.approx_blocks(state)[name]
    fm.assert_close(block, fm.eigen_block(layer.q_in, layer.q_out, s), RTOL)


@f64
@pytest.mark.parametrize("name", list(fm.ZOO_LAYERS))
@pytest.mark.parametrize("corrected", ["ekfac", "tekfac"])
def test_theorem_3_1_eigen_correction_never_increases_the_error(corrected, name):
    """|F - F_EKFAC|_F <= |F - F_KFAC|_F and |F - F_TEKFAC|_F <= |F - F_TKFAC|_F.

    F_KFAC = A (x) G and F_TKFAC = M_Phi (x) M_Psi / delta come from the section 2 formulas
    (test_curvature checks the optimizer's blocks against the same formulas).
    """
    state, _, out = fm.one_update("zoo", corrected)
    layer = state.layers[name]
    a, u = fm.layer_mats(fm.flat(out.stats)[name])
    if corrected == "ekfac":
        base = np.kron(*fm.kfac_np(a, u))
    else:
        base = np.kron(*fm.tkfac_np(a, u)) / np.trace(fm.f1_np(a, u))
    # The un-corrected block is diagonal in the corrected method's basis Q = Q_in (x) Q_out:
    # its diagonal there is S_KFAC = outer(eig A, eig G) (or S_TKFAC), which S replaces by
    # the best diagonal diag(Q^T F Q).
    q = np.kron(np.asarray(layer.q_in, np.float64), np.asarray(layer.q_out, np.float64))
    rotated = q.T @ base @ q
    off_diagonal = rotated - np.diag(np.diag(rotated))
    assert np.abs(off_diagonal).max() <= 1e-12 * np.abs(base).max()
    exact = fm.exact_fisher("zoo")[name]
    err_base = np.linalg.norm(exact - base)
    err = np.linalg.norm(exact - fm.approx_blocks(state)[name])
    assert err <= err_base * (1 + 1e-9) + 1e-12 * np.linalg.norm(exact)


@f64
def test_per_location_s_is_diagonal_of_f1():
    """conv_rescale="per_location": S = diag(Q^T F1 Q) (F1 = F for T = 1 layers)."""
    config = fm.EXACT + (("conv_rescale", "per_location"),)
    state, _, out = fm.one_update("dampnet", "tekfac", config)
    for name, leaf in fm.flat(out.stats).items():
        layer = state.layers[name]
        a, u = fm.layer_mats(leaf)
        f1 = fm.f1_np(a, u)
        fm.assert_close(layer.rescale, _diag_in_basis(layer, f1), RTOL, err_msg=name)
        fm.assert_close(np.sum(layer.rescale), np.trace(f1), RTOL, err_msg=name)
        # Live convolutions (T > 1): F1 != F, so per_location is not the exact S.
        if np.any(a):
            exact_s = _s_batch(layer, a, u)
            assert np.allclose(layer.rescale, exact_s) == (a.shape[1] == 1), name


def _random_problem(seed, samples, n, t, d_in, d_out):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, t, d_in))
    u = rng.normal(size=(samples, n, t, d_out))
    q_in = np.linalg.qr(rng.normal(size=(d_in, d_in)))[0]
    q_out = np.linalg.qr(rng.normal(size=(d_out, d_out)))[0]
    return a, u, q_in, q_out


@f64
@pytest.mark.parametrize(
    "samples, n, t, d_in, d_out",
    [(2, 5, 6, 3, 2), (1, 4, 9, 5, 2), (3, 2, 1, 2, 4)],
)
def test_per_example_paths_agree(samples, n, t, d_in, d_out):
    """project_first and multiply_first compute the same sum."""
    a, u, q_in, q_out = _random_problem(t * d_in + d_out, samples, n, t, d_in, d_out)
    want = _s_exact(a, u, q_in, q_out)
    args = tuple(jnp.asarray(v) for v in (a, u, q_in, q_out))
    for project_first in (True, False):
        got = rescale._per_example_sum(*args, project_first=project_first)
        fm.assert_close(np.asarray(got) / (samples * n), want, RTOL)
    fm.assert_close(rescale.per_example(*args), want, RTOL)
    if t == 1:  # rank-one per-example gradients: per_location is the exact S.
        ap, up = args[0] @ args[2], args[1] @ args[3]
        fm.assert_close(rescale.per_location(ap, up), want, RTOL)


@f64
def test_chunked_s_with_label_samples_matches_sampled_fisher(monkeypatch):
    """Chunked per-example S with 2 label samples: S = diag(Q^T F Q), F sampled, same rng."""
    _, logits_fn, params, _, y = fm.problem("dampnet")
    monkeypatch.setattr(patches, "CHUNK_ELEMENTS", 60)  # streamed in chunks, some padded
    rng = jax.random.key(7)
    capture = fm.capture_fn("dampnet", "sampled", 2)
    out = capture(params, *fm.batch("dampnet", 0), rng)
    opt = tekfax.scale_by_tekfac(**dict(fm.EXACT))  # traced after the patch: chunked
    _, state = fm.jit(lambda g, s, st: opt.update(g, s, stats=st))(
        out.grads, fm.jit(opt.init)(params), out.stats
    )
    exact = fm.flat(
        fm.jit(
            lambda p, rng: exact_fisher_blocks(
                logits_fn, p, y, fisher="sampled", rng=rng, num_samples=2
            )
        )(params, rng)
    )
    for name, leaf in fm.flat(out.stats).items():
        assert leaf.out_grads.shape[0] == 2
        layer = state.layers[name]
        fm.assert_close(layer.rescale, _diag_in_basis(layer, exact[name]), RTOL, err_msg=name)
        fm.assert_close(np.sum(layer.rescale), np.trace(exact[name]), RTOL, err_msg=name)


@functools.cache
def _schedule_run(preset, eigen_every, rescale_every, steps):
    config = (
        ("damping", 1e-3),
        ("rescale_ema", 0.5),
        ("eigen_every", eigen_every),
        ("rescale_every", rescale_every),
    )
    return fm.run("dampnet", preset, config, seeds=tuple(range(steps)))


@f64
@pytest.mark.parametrize(
    "preset, eigen_every, rescale_every, steps",
    [("ekfac", 2, 1, 5), ("tekfac", 3, 2, 7)],
)
def test_s_reinitialised_on_refresh_and_averaged_otherwise(
    preset, eigen_every, rescale_every, steps
):
    """Section 3 with eps_S = 0.5: refresh S = 0.5 S_init + 0.5 S_batch, else 0.5 S + 0.5 S_b."""
    states, _, outs = _schedule_run(preset, eigen_every, rescale_every, steps)
    for name in states[0].layers:
        s_prev = None
        for k, (state, out) in enumerate(zip(states, outs, strict=True)):
            layer = state.layers[name]
            refresh = k % eigen_every == 0
            if not refresh:  # the basis is kept between refreshes
                np.testing.assert_array_equal(layer.q_in, states[k - 1].layers[name].q_in)
                np.testing.assert_array_equal(layer.q_out, states[k - 1].layers[name].q_out)
            s_batch = _s_batch(layer, *fm.layer_mats(fm.flat(out.stats)[name]))
            if refresh:
                s_init = np.outer(layer.eig_in, layer.eig_out)
                if preset == "tekfac":  # a dead layer (delta = 0) has M_Phi = 0: S_init = 0
                    delta = float(layer.delta)
                    s_init = s_init / delta if delta > 0 else 0.0 * s_init
                want = 0.5 * s_init + 0.5 * s_batch
            elif k % rescale_every == 0:
                want = 0.5 * s_prev + 0.5 * s_batch
            else:
                want = s_prev
            fm.assert_close(layer.rescale, want, RTOL, err_msg=f"{name} step {k}")
            s_prev = np.asarray(layer.rescale)


def test_s_trace_and_diagonal_float32():
    """float32: sum(S) = tr F and S = diag(Q^T F Q), loose tolerance."""
    state, _, out = fm.one_update("dampnet", "tekfac", dtype_name="float32")
    for name, leaf in fm.flat(out.stats).items():
        layer = state.layers[name]
        assert layer.rescale.dtype == jnp.float32
        exact = fm.fisher_np(*fm.layer_mats(leaf))
        fm.assert_close(np.sum(layer.rescale), np.trace(exact), 1e-4, err_msg=name)
        fm.assert_close(layer.rescale, _diag_in_basis(layer, exact), 1e-4, err_msg=name)


def _streamed_functions(q_in, q_out):
    """The statistics sum_over_examples streams, with the layer's bases Q_in, Q_out."""
    return {
        "kfac": lambda a, u: curvature.kfac_factors(a, u),
        "tkfac": lambda a, u: curvature.tkfac_moments(a, u),
        "per_example": functools.partial(rescale.per_example, q_in=q_in, q_out=q_out),
        "per_location": lambda a, u: rescale.per_location(a @ q_in, u @ q_out),
    }


def _whole_and_streamed(stats, bases):
    """Per layer and statistic: (fn on the whole batch's a and u, sum_over_examples of fn)."""
    whole, streamed = {}, {}
    for name, st in stats.items():
        a = patches.input_matrix(st.inputs, st.meta)
        u = patches.output_matrix(st.out_grads)
        functions = _streamed_functions(*bases[name])
        whole[name] = {key: fn(a, u) for key, fn in functions.items()}
        streamed[name] = {
            key: patches.sum_over_examples(
                fn, st.inputs, st.out_grads, st.meta, jnp.float64, per_example=1
            )
            for key, fn in functions.items()
        }
    return whole, streamed


@f64
@pytest.mark.parametrize("n, budget", [(4, 1), (7, 4), (4, 60)])
def test_streamed_statistics_equal_whole_batch(monkeypatch, n, budget):
    """sum_over_examples equals the whole batch: 4 chunks of 1; 7 examples (the batch twice,
    cut) in 2 chunks of 4 with one padding example, whose bias row must be zeroed; one chunk.
    Every layer's whole-batch and streamed statistics are one compiled program (traced with
    the patched chunk budget), not the operations one by one."""
    _, _, params, _, _ = fm.problem("dampnet")
    out = fm.capture_fn("dampnet", "sampled", 2)(params, *fm.batch("dampnet", 0), jax.random.key(3))
    stats, bases = {}, {}
    for name, full in fm.flat(out.stats).items():
        st = full.replace(
            inputs=jnp.concatenate([full.inputs] * 2)[:n],
            out_grads=jnp.concatenate([full.out_grads] * 2, axis=1)[:, :n],
        )
        rng = np.random.default_rng(0)
        q_in = jnp.asarray(np.linalg.qr(rng.normal(size=(st.meta.d_in,) * 2))[0])
        q_out = jnp.asarray(np.linalg.qr(rng.normal(size=(st.meta.d_out,) * 2))[0])
        stats[name], bases[name] = st, (q_in, q_out)
    monkeypatch.setattr(patches, "CHUNK_ELEMENTS", budget)
    assert patches.chunking(n, 1) == {1: (1, 1, 4), 4: (1, 4, 2), 60: (1, 4, 1)}[budget]
    # A new function, so the program is traced here with this budget, not taken from the
    # cache of another budget's test of the same shapes.
    whole, streamed = jit(lambda *args: _whole_and_streamed(*args))(stats, bases)
    assert set(streamed) == set(stats) and all(len(v) == 4 for v in streamed.values())
    chex.assert_trees_all_close(streamed, whole, rtol=1e-12, atol=1e-12)
