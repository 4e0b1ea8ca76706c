"""Schedules: each named schedule against its formula, the derived tables against
their definitions (Ho et al. 2020 eqs. 4, 6-7), respacing, timestep spacings
and the pytree contract. References are computed here in float64 NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj

EPS32 = float(np.finfo(np.float32).eps)


def f64(x):
    return np.asarray(x, np.float64)


# --- Independent references ------------------------------------------------------


def reference_linear_betas(T):
    scale = 1000.0 / T
    return np.linspace(1e-4 * scale, 0.02 * scale, T)


def reference_cosine_betas(T, s=0.008):
    """Nichol & Dhariwal 2021 eq. 17, betas capped at 0.999 (their sec. 3.2)."""
    t = np.arange(T + 1, dtype=np.float64)
    f = np.cos(((t / T + s) / (1 + s)) * np.pi / 2) ** 2
    abar = f / f[0]
    return np.minimum(1 - abar[1:] / abar[:-1], 0.999)


def reference_sigmoid_betas(T, start=-3.0, end=3.0, tau=1.0):
    """Jabri et al. 2022 (RIN), sigmoid_schedule.

    alphabar(u) = (v_end - sig((u (end - start) + start) / tau)) / (v_end - v_start),
    with v_end = sig(end / tau) and v_start = sig(start / tau).
    """

    def sig(z):
        return 1.0 / (1.0 + np.exp(-z))

    u = np.arange(T + 1, dtype=np.float64) / T
    abar = (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))
    return np.minimum(1 - abar[1:] / abar[:-1], 0.999)


def all_schedules():
    return {
        "linear": dj.make_schedule("linear", 1000),
        "linear_T50": dj.make_schedule("linear", 50),
        "cosine": dj.make_schedule("cosine", 1000),
        "sigmoid": dj.make_schedule("sigmoid", 1000),
        "sigmoid_T64_tau": dj.make_schedule("sigmoid", 64, start=-2.0, end=4.0, tau=0.7),
        "log_snr_linear": dj.make_schedule("log_snr_linear", 1000),
        "respaced_cosine": dj.respace(dj.make_schedule("cosine", 1000), dj.evenly_spaced_timesteps(1000, 37)),
    }


# --- Named schedules against their formulas ---------------------------------------


def test_linear_schedule_alphas_cumprod_at_T_1000():
    s = dj.make_schedule("linear", 1000)
    # prod_{t=1}^{1000} (1 - beta_t) with beta from 1e-4 to 0.02 (Ho et al. 2020 sec. 4).
    np.testing.assert_allclose(float(s.alphas_cumprod[999]), 4.0358e-5, rtol=1e-4)
    np.testing.assert_allclose(f64(s.betas), reference_linear_betas(1000), rtol=2 * EPS32)


@pytest.mark.parametrize("T", [40, 100, 250, 4000])
def test_linear_schedule_scales_ends_by_1000_over_T(T):
    s = dj.make_schedule("linear", T)
    betas = f64(s.betas)
    np.testing.assert_allclose(betas[0], 1e-4 * 1000 / T, rtol=2 * EPS32)
    np.testing.assert_allclose(betas[-1], 0.02 * 1000 / T, rtol=2 * EPS32)
    # Evenly spaced in between.
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) * 1000 / T / (T - 1), rtol=1e-4 if T < 4000 else 1e-2)


def test_linear_schedule_custom_ends():
    s = dj.make_schedule("linear", 1000, beta_start=1e-3, beta_end=0.05)
    np.testing.assert_allclose(f64(s.betas)[[0, -1]], [1e-3, 0.05], rtol=2 * EPS32)


@pytest.mark.parametrize("T", [1000, 100])
def test_cosine_schedule_matches_its_formula(T):
    s = dj.make_schedule("cosine", T)
    betas = reference_cosine_betas(T)
    assert betas[-1] == 0.999  # the cap is active at the end; the test covers it
    np.testing.assert_allclose(f64(s.betas), betas, rtol=2 * EPS32)
    # alphabar = prod(1 - beta), not f(t)/f(0), where the cap changed a beta.
    # Each float32 beta near 0.999 carries a relative error eps32/(1 - beta) in 1 - beta.
    np.testing.assert_allclose(f64(s.alphas_cumprod), np.cumprod(1 - betas), rtol=4 * EPS32 / 1e-3)


def test_cosine_schedule_other_offset():
    s = dj.make_schedule("cosine", 200, s=0.02)
    np.testing.assert_allclose(f64(s.betas), reference_cosine_betas(200, s=0.02), rtol=2 * EPS32)


@pytest.mark.parametrize("kwargs", [{}, dict(start=0.0, end=3.0, tau=0.5), dict(start=-3.0, end=3.0, tau=1.1)])
def test_sigmoid_schedule_matches_its_formula(kwargs):
    T = 500
    s = dj.make_schedule("sigmoid", T, **kwargs)
    betas = reference_sigmoid_betas(T, **kwargs)
    np.testing.assert_allclose(f64(s.betas), betas, rtol=2 * EPS32)
    np.testing.assert_allclose(f64(s.alphas_cumprod), np.cumprod(1 - betas), rtol=4 * EPS32 / 1e-3)


def test_log_snr_linear_is_linear_in_t():
    T = 1000
    s = dj.make_schedule("log_snr_linear", T, log_snr_max=8.0, log_snr_min=-12.0)
    abar, one_minus = f64(s.alphas_cumprod), f64(s.one_minus_alphas_cumprod)
    snr = abar / one_minus
    lam_expected = np.linspace(8.0, -12.0, T)
    # Float32 storage of alphabar and 1 - alphabar: relative error eps32 in each.
    np.testing.assert_allclose(np.log(snr), lam_expected, atol=4 * EPS32 * 12)
    # SNR a geometric sequence: a constant ratio between steps.
    ratio = snr[1:] / snr[:-1]
    np.testing.assert_allclose(ratio, np.exp(-20.0 / (T - 1)), rtol=8 * EPS32)
    # alphabar = sigmoid(lambda), beta = 1 - alphabar_t / alphabar_{t-1}.
    ref_abar = 1 / (1 + np.exp(-lam_expected))
    np.testing.assert_allclose(abar, ref_abar, rtol=2 * EPS32)
    ref_betas = 1 - ref_abar / np.concatenate([[1.0], ref_abar[:-1]])
    np.testing.assert_allclose(f64(s.betas), ref_betas, rtol=2 * EPS32)


# --- Every schedule: valid tables that satisfy their definitions -----------------


@pytest.mark.parametrize("name", list(all_schedules()))
def test_tables_are_a_valid_schedule_and_satisfy_their_definitions(name):
    s = all_schedules()[name]
    T = s.num_timesteps
    betas, abar = f64(s.betas), f64(s.alphas_cumprod)
    one_minus, abar_prev = f64(s.one_minus_alphas_cumprod), f64(s.alphas_cumprod_prev)
    for table in jax.tree_util.tree_leaves(s)[:-1]:
        assert table.shape == (T,) and table.dtype == jnp.float32
    assert s.timesteps.shape == (T,) and s.timesteps.dtype == jnp.int32

    assert np.all((betas > 0) & (betas < 1))
    assert np.all((abar > 0) & (abar < 1))
    assert np.all(np.diff(abar) < 0)
    assert np.all(np.diff(one_minus) > 0)
    np.testing.assert_allclose(abar + one_minus, 1.0, atol=2 * EPS32)

    # alphabar_t = prod_{s<=t} (1 - beta_s) (eq. 4): each float32 beta contributes a
    # relative error of at most eps32 * beta / (1 - beta) to its factor.
    tol = 2 * EPS32 * np.cumsum(betas / (1 - betas)) + 2 * EPS32
    np.testing.assert_array_less(np.abs(np.cumsum(np.log1p(-betas)) - np.log(abar)), tol)
    np.testing.assert_array_equal(abar_prev, np.concatenate([[1.0], abar[:-1]]))

    # Eq. 7, with 1 - alphabar_{t-1} read from the accurate table (0 at t = 0).
    one_minus_prev = np.concatenate([[0.0], one_minus[:-1]])
    post_var = betas * one_minus_prev / one_minus
    np.testing.assert_allclose(f64(s.posterior_variance), post_var, rtol=8 * EPS32, atol=1e-30)
    assert float(s.posterior_variance[0]) == 0.0
    np.testing.assert_allclose(
        f64(s.posterior_log_variance_clipped), np.log(np.concatenate([post_var[1:2], post_var[1:]])), atol=8 * EPS32
    )
    np.testing.assert_allclose(f64(s.posterior_mean_coef1), betas * np.sqrt(abar_prev) / one_minus, rtol=8 * EPS32)
    # sqrt(1 - beta) from a float32 beta has relative error eps32 * beta / (1 - beta) / 2.
    coef2 = np.sqrt(1 - betas) * one_minus_prev / one_minus
    np.testing.assert_array_less(
        np.abs(f64(s.posterior_mean_coef2) - coef2), 8 * EPS32 * (1 + betas / (1 - betas)) * coef2 + 1e-30
    )
    # The x_0 coefficient at t = 0 is 1 and the x_t one 0: q(x_0 | x_1, x_0) is a point mass.
    np.testing.assert_allclose(float(s.posterior_mean_coef1[0]), 1.0, rtol=4 * EPS32)
    assert float(s.posterior_mean_coef2[0]) == 0.0


def test_single_step_schedule():
    s = dj.make_schedule("linear", 1, beta_start=1e-5, beta_end=1e-4)
    np.testing.assert_allclose(float(s.betas[0]), 0.01, rtol=2 * EPS32)  # 1e-5 * 1000 / 1
    np.testing.assert_allclose(float(s.alphas_cumprod[0]), 0.99, rtol=2 * EPS32)
    assert np.isfinite(float(s.posterior_log_variance_clipped[0]))


# --- Respacing ------------------------------------------------------------------


def reference_log_alphas_cumprod(name):
    betas64 = reference_linear_betas(1000) if name == "linear" else reference_cosine_betas(1000)
    return np.cumsum(np.log1p(-betas64))


KEPT = np.array([0, 3, 10, 99, 100, 500, 998, 999])


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_respace_keeps_alphas_cumprod_at_kept_steps(name):
    base = dj.make_schedule(name, 1000)
    r = dj.respace(base, KEPT)
    assert r.num_timesteps == len(KEPT)
    np.testing.assert_array_equal(np.asarray(r.timesteps), KEPT)
    np.testing.assert_allclose(f64(r.alphas_cumprod), f64(base.alphas_cumprod)[KEPT], rtol=1e-6)
    np.testing.assert_allclose(f64(r.one_minus_alphas_cumprod), f64(base.one_minus_alphas_cumprod)[KEPT], rtol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_respaced_betas_multiply_to_alphas_cumprod(name):
    base = dj.make_schedule(name, 1000)
    r = dj.respace(base, KEPT)
    np.testing.assert_array_equal(np.asarray(r.timesteps), KEPT)
    log_abar = reference_log_alphas_cumprod(name)[KEPT]
    # The kept rows' alphabar, to the float32 accuracy of the input betas: a beta near
    # 0.999 (cosine's capped last step) has relative error eps32 / 1e-3 in 1 - beta.
    np.testing.assert_allclose(f64(r.alphas_cumprod), np.exp(log_abar), rtol=4 * EPS32 / 1e-3)
    # beta'_i = 1 - alphabar_{k_i} / alphabar_{k_{i-1}} (Nichol & Dhariwal 2021 sec. 4).
    ref_betas = -np.expm1(np.diff(np.concatenate([[0.0], log_abar])))
    np.testing.assert_allclose(f64(r.betas), ref_betas, rtol=8 * EPS32)
    assert_cumprod_close(f64(r.betas), np.exp(log_abar))


def assert_cumprod_close(betas32, abar):
    """prod_{s<=t} (1 - beta_s) = alphabar_t, given betas rounded to float32.

    Rounding beta changes the factor 1 - beta by a relative eps32 * beta / (1 - beta),
    which is large for a respaced beta' close to 1.
    """
    rel = np.abs(np.cumprod(1 - betas32) / abar - 1)
    np.testing.assert_array_less(rel, 2 * EPS32 * np.cumsum(betas32 / (1 - betas32)) + 2 * EPS32)


def test_respace_composes():
    base = dj.make_schedule("linear", 1000)
    first = np.array([0, 5, 20, 100, 101, 400, 700, 999])
    second = np.array([0, 2, 3, 6, 7])
    twice = dj.respace(dj.respace(base, first), second)
    once = dj.respace(base, first[second])
    np.testing.assert_array_equal(np.asarray(twice.timesteps), first[second])
    # The second respacing reads the first one's float32 betas (see assert_cumprod_close).
    betas_first = f64(dj.respace(base, first).betas)
    rtol = 2 * EPS32 * np.sum(betas_first / (1 - betas_first)) + 4 * EPS32
    for a, b in zip(jax.tree_util.tree_leaves(twice), jax.tree_util.tree_leaves(once), strict=True):
        np.testing.assert_allclose(f64(a), f64(b), rtol=rtol)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_respace_of_a_five_step_cosine_schedule_composes():
    """What sample(..., num_steps=3) does to a schedule already respaced to 5 cosine steps."""
    base = dj.make_schedule("cosine", 1000)
    # The last beta' = 1 - 1.2e-8 is stored as 1.0 in float32; alphabar must not be rebuilt from it.
    five = dj.respace(base, dj.evenly_spaced_timesteps(1000, 5))
    twice = dj.respace(five, [0, 2, 4])
    np.testing.assert_allclose(f64(twice.alphas_cumprod), f64(base.alphas_cumprod)[[0, 500, 999]], rtol=1e-6)
    assert np.all(np.isfinite(f64(twice.log_snr)))


def test_respace_with_all_rows_is_identity():
    base = dj.make_schedule("linear", 100)
    same = dj.respace(base, np.arange(100))
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(base), strict=True):
        np.testing.assert_allclose(f64(a), f64(b), rtol=4 * EPS32)


# --- Timestep spacings ---------------------------------------------------------------


@pytest.mark.parametrize("T,n", [(1000, 2), (1000, 10), (1000, 50), (1000, 999), (1000, 1000), (7, 3), (7, 7)])
def test_evenly_spaced_timesteps(T, n):
    idx = dj.evenly_spaced_timesteps(T, n)
    assert idx.shape == (n,) and np.issubdtype(idx.dtype, np.integer)
    assert np.all(np.diff(idx) > 0)
    assert idx[0] == 0 and idx[-1] == T - 1
    # Each index is the rounding of its evenly spaced target.
    np.testing.assert_array_less(np.abs(idx - np.linspace(0, T - 1, n)), 0.5 + 1e-9)


def test_evenly_spaced_single_step_keeps_last():
    np.testing.assert_array_equal(dj.evenly_spaced_timesteps(1000, 1), [999])


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("n", [2, 10, 20, 100, 500, 1000])
def test_log_snr_spaced_timesteps_counts_and_order(name, n):
    s = dj.make_schedule(name, 1000)
    idx = dj.log_snr_spaced_timesteps(s, n)
    assert idx.shape == (n,)
    assert np.all(np.diff(idx) > 0)
    assert idx[0] == 0 and idx[-1] == 999


@pytest.mark.parametrize("n", [10, 20])
def test_log_snr_spacing_is_nearly_uniform_in_log_snr(n):
    """Each interior row is the row nearest its evenly spaced log-SNR target.

    The targets run from max(lambda_{T-1}, -10) to lambda_0. Rounding to the grid
    moves a row's lambda by at most half the local row gap, so each gap differs
    from the uniform step h by at most the two half-gaps at its ends.
    """
    s = dj.make_schedule("linear", 1000)
    lam = np.log(f64(s.alphas_cumprod)) - np.log(f64(s.one_minus_alphas_cumprod))
    idx = dj.log_snr_spaced_timesteps(s, n)
    targets = np.linspace(lam[0], max(lam[-1], -10.0), n)
    row_gap = np.abs(np.diff(lam))
    local_half_gap = 0.5 * np.maximum(row_gap[np.maximum(idx - 1, 0)], row_gap[np.minimum(idx, 998)])
    err = np.abs(lam[idx] - targets)
    np.testing.assert_array_less(err[1:-1], local_half_gap[1:-1] + 1e-6)
    h = (lam[0] - max(lam[-1], -10.0)) / (n - 1)
    gaps = -np.diff(lam[idx])
    slack = local_half_gap[:-1] + local_half_gap[1:] + abs(lam[-1] - max(lam[-1], -10.0))
    np.testing.assert_array_less(np.abs(gaps - h), slack + 1e-6)
    # Time spacing is far from uniform in log-SNR: the first gap alone is several h.
    time_idx = dj.evenly_spaced_timesteps(1000, n)
    assert -np.diff(lam[time_idx])[0] > 2 * h


# --- From log-SNR -----------------------------------------------------------------------


def test_schedule_from_log_snr_inverts_log_snr():
    rng = np.random.default_rng(0)
    lam = np.sort(rng.uniform(-12, 12, size=300))[::-1]
    lam = lam[np.concatenate([[True], np.diff(lam) < 0])]
    s = dj.schedule_from_log_snr(lam)
    # lambda from float32 alphabar and 1 - alphabar: each has relative error eps32.
    np.testing.assert_allclose(f64(s.log_snr), lam, atol=8 * EPS32)
    np.testing.assert_allclose(np.log(f64(s.alphas_cumprod) / f64(s.one_minus_alphas_cumprod)), lam, atol=4 * EPS32)
    assert np.all((f64(s.betas) > 0) & (f64(s.betas) < 1))


def test_schedule_from_log_snr_round_trips_a_named_schedule():
    base = dj.make_schedule("cosine", 1000)
    lam = np.log(f64(base.alphas_cumprod)) - np.log(f64(base.one_minus_alphas_cumprod))
    again = dj.schedule_from_log_snr(lam)
    np.testing.assert_allclose(f64(again.alphas_cumprod), f64(base.alphas_cumprod), rtol=4 * EPS32)
    np.testing.assert_allclose(f64(again.one_minus_alphas_cumprod), f64(base.one_minus_alphas_cumprod), rtol=4 * EPS32)


def test_traced_and_concrete_schedule_builders_agree():
    """Inside jit the builders run in float32 JAX; outside in float64 NumPy."""
    # A float32 log-SNR near 9 has absolute error ~5e-7, i.e. relative ~5e-7 in
    # 1 - alphabar and ~1e-5 in beta, the difference of two such numbers near t = 0.
    lam = np.linspace(9.0, -9.0, 200)
    eager = dj.schedule_from_log_snr(lam)
    traced = jax.jit(dj.schedule_from_log_snr)(jnp.asarray(lam, jnp.float32))
    for name in ("betas", "alphas_cumprod", "one_minus_alphas_cumprod", "alphas_cumprod_prev"):
        np.testing.assert_allclose(f64(getattr(traced, name)), f64(getattr(eager, name)), rtol=1e-4)
    betas = reference_linear_betas(100)
    eager = dj.schedule_from_betas(betas)
    traced = jax.jit(dj.schedule_from_betas)(jnp.asarray(betas, jnp.float32))
    for a, b in zip(jax.tree_util.tree_leaves(traced), jax.tree_util.tree_leaves(eager), strict=True):
        np.testing.assert_allclose(f64(a), f64(b), rtol=1e-4, atol=1e-30)


def test_traced_posterior_tables_are_accurate_at_high_log_snr():
    lam = np.linspace(12.0, -10.0, 200)
    traced = jax.jit(dj.schedule_from_log_snr)(jnp.asarray(lam, jnp.float32))
    # float64 reference from the float32-rounded lambda the traced path saw.
    lam32 = f64(np.float32(lam))
    one_minus = 1 / (1 + np.exp(lam32))
    abar = 1 / (1 + np.exp(-lam32))
    one_minus_prev = np.concatenate([[0.0], one_minus[:-1]])
    betas = -np.expm1(np.log(abar) - np.log(np.concatenate([[1.0], abar[:-1]])))
    # Betas are accurate to ~1e-5 (see the test above), so 1e-4 is the reachable accuracy.
    np.testing.assert_allclose(f64(traced.posterior_variance), betas * one_minus_prev / one_minus, rtol=1e-4)
    np.testing.assert_allclose(
        f64(traced.posterior_mean_coef2), np.sqrt(1 - betas) * one_minus_prev / one_minus, rtol=1e-4
    )


def test_traced_respace_keeps_alpha_accurate_where_beta_is_near_one():
    """The last row of a 50-step cosine respacing has beta ~ 1 - 2.5e-6: alpha_t = 1 - beta_t in
    float32 kept one digit (coef2 off by 5e-4 relative); the ratio alphabar_t / alphabar_{t-1} keeps it."""
    base = dj.make_schedule("cosine", 1000)
    kept = dj.evenly_spaced_timesteps(1000, 50)
    traced = jax.jit(lambda s: dj.respace(s, kept))(base)
    abar = f64(base.alphas_cumprod)[np.asarray(kept)]
    one_minus = f64(base.one_minus_alphas_cumprod)[np.asarray(kept)]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    one_minus_prev = np.concatenate([[0.0], one_minus[:-1]])
    assert 1 - abar[-1] / abar_prev[-1] > 0.99999  # the row this is about
    np.testing.assert_allclose(f64(traced.posterior_mean_coef2),
                               np.sqrt(abar / abar_prev) * one_minus_prev / one_minus, rtol=2e-5, atol=1e-30)


# --- Pytree contract ----------------------------------------------------------------------


def test_schedule_is_a_pytree():
    s = dj.make_schedule("linear", 100)
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 9
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, dj.DiffusionSchedule)

    doubled = jax.tree_util.tree_map(lambda x: x * 2, s)
    assert isinstance(doubled, dj.DiffusionSchedule)
    np.testing.assert_array_equal(np.asarray(doubled.betas), 2 * np.asarray(s.betas))

    @jax.jit
    def last_abar_and_T(sched):
        return sched.alphas_cumprod[-1], sched.num_timesteps  # T is static: a shape

    abar_T, T = last_abar_and_T(s)
    assert T == 100
    np.testing.assert_allclose(float(abar_T), np.prod(1 - reference_linear_betas(100)), rtol=1e-5)

    # vmap over a stack of two schedules.
    s2 = dj.make_schedule("cosine", 100)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), s, s2)
    out = jax.vmap(lambda sched: sched.alphas_cumprod[-1])(stacked)
    np.testing.assert_allclose(
        f64(out), [np.prod(1 - reference_linear_betas(100)), np.prod(1 - reference_cosine_betas(100))], rtol=1e-4
    )


def test_schedule_names_listed():
    assert set(dj.SCHEDULE_NAMES) == {"linear", "cosine", "sigmoid", "log_snr_linear"}
