"""The forward process, its posterior, prediction conversions and the reverse-process
Gaussian, against Ho et al. 2020 eqs. 4, 6-7, 11-12 and Nichol & Dhariwal 2021
eq. 15, with references computed here in float64 NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj

T = 1000
EPS32 = float(np.finfo(np.float32).eps)
BETAS = np.linspace(1e-4, 0.02, T)  # Ho et al. 2020 sec. 4, float64
ABAR = np.cumprod(1 - BETAS)
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])


@pytest.fixture(scope="module")
def schedule():
    return dj.make_schedule("linear", T)


def f64(x):
    return np.asarray(x, np.float64)


def batch(seed, shape):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)


# --- q(x_t | x_0) -------------------------------------------------------------


def test_q_sample_is_eq4_with_given_noise(schedule):
    x0, noise = batch(0, (6, 3, 2)), batch(1, (6, 3, 2))
    t = jnp.array([0, 1, 10, 500, 998, 999])
    x_t = jax.jit(dj.q_sample)(schedule, x0, t, noise)
    a = np.sqrt(ABAR[np.asarray(t)])[:, None, None]
    expected = a * f64(x0) + np.sqrt(1 - a**2) * f64(noise)
    np.testing.assert_allclose(f64(x_t), expected, atol=1e-6)


@pytest.mark.parametrize("row", [0, 250, 999])
def test_q_sample_moments_match_eq4(schedule, row):
    """Empirical mean and variance of 200k draws of x_t given a scalar x_0."""
    n, x0_value = 200_000, 0.7
    x0 = jnp.full((n, 1), x0_value, jnp.float32)
    t = jnp.full((n,), row, jnp.int32)
    draw = jax.jit(lambda key: dj.q_sample(schedule, x0, t, jax.random.normal(key, x0.shape)))
    x_t = f64(draw(jax.random.PRNGKey(row)))[:, 0]
    mean, var = np.sqrt(ABAR[row]) * x0_value, 1 - ABAR[row]
    # Standard errors of the sample mean and variance of a Gaussian; 5 of them.
    assert abs(x_t.mean() - mean) < 5 * np.sqrt(var / n)
    assert abs(x_t.var(ddof=1) - var) < 5 * var * np.sqrt(2 / (n - 1))


def test_q_mean_variance(schedule):
    x0 = batch(2, (3, 4))
    t = jnp.array([0, 300, 999])
    mean, var, log_var = jax.jit(dj.q_mean_variance)(schedule, x0, t)
    ab = ABAR[np.asarray(t)][:, None]
    np.testing.assert_allclose(f64(mean), np.sqrt(ab) * f64(x0), atol=1e-6)
    np.testing.assert_allclose(f64(var), np.broadcast_to(1 - ab, (3, 4)), rtol=1e-5)
    np.testing.assert_allclose(f64(log_var), np.log(np.broadcast_to(1 - ab, (3, 4))), atol=1e-5)


# --- q(x_{t-1} | x_t, x_0) ----------------------------------------------------------


def reference_posterior(x0, x_t, row):
    """The posterior q(x_{t-1} | x_t, x_0) as a product of the forward Gaussians.

    q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}).

    Completing the square in x_{t-1}: the precisions add and the mean is the
    precision-weighted combination. Row 0 has abar_{-1} = 1: a point mass at x_0.
    """
    if row == 0:
        return x0, np.zeros_like(x0)
    beta, abar_prev = BETAS[row], ABAR_PREV[row]
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    mean = (np.sqrt(1 - beta) * x_t / beta + np.sqrt(abar_prev) * x0 / (1 - abar_prev)) / precision
    return mean, np.full_like(x0, 1 / precision)


@pytest.mark.parametrize("row", [0, 1, 2, 50, 500, 998, 999])
def test_posterior_is_the_product_of_forward_gaussians(schedule, row):
    rng = np.random.default_rng(row)
    x0 = rng.uniform(-1, 1, (4, 5))
    x_t = np.sqrt(ABAR[row]) * x0 + np.sqrt(1 - ABAR[row]) * rng.standard_normal((4, 5))
    t = jnp.full((4,), row, jnp.int32)
    mean, var, log_var = jax.jit(dj.q_posterior_mean_variance)(
        schedule, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), t
    )
    ref_mean, ref_var = reference_posterior(x0, x_t, row)
    # float32 inputs (|x| <= ~4) and coefficients: a few eps32 of the largest term.
    np.testing.assert_allclose(f64(mean), ref_mean, atol=2e-6)
    np.testing.assert_allclose(f64(var), ref_var, rtol=1e-5, atol=0)
    # The log variance is clipped at row 0 to the row-1 value (tilde-beta_0 = 0).
    clipped = reference_posterior(x0, x_t, 1)[1] if row == 0 else ref_var
    np.testing.assert_allclose(f64(log_var), np.log(clipped), atol=1e-5)
    assert np.all(np.isfinite(f64(log_var)))


# --- Prediction conversions -----------------------------------------------------------


def test_v_definition_and_round_trips(schedule):
    rows = np.array([0, 1, 100, 500, 900, 999])
    rng = np.random.default_rng(3)
    x0, eps = rng.uniform(-1, 1, (6, 8)), rng.standard_normal((6, 8))
    a, s = np.sqrt(ABAR[rows])[:, None], np.sqrt(1 - ABAR[rows])[:, None]
    x_t, v = a * x0 + s * eps, a * eps - s * x0  # Salimans & Ho 2022 sec. 4
    t = jnp.asarray(rows, jnp.int32)
    j = lambda z: jnp.asarray(z, jnp.float32)  # noqa: E731

    conv = jax.jit(
        lambda x0, eps, x_t, v: dict(
            v=dj.v_from_x0_eps(schedule, x0, eps, t),
            x0_from_eps=dj.x0_from_eps(schedule, x_t, t, eps),
            eps_from_x0=dj.eps_from_x0(schedule, x_t, t, x0),
            x0_from_v=dj.x0_from_v(schedule, x_t, t, v),
            eps_from_v=dj.eps_from_v(schedule, x_t, t, v),
        )
    )
    out = {k: f64(val) for k, val in conv(j(x0), j(eps), j(x_t), j(v)).items()}
    np.testing.assert_allclose(out["v"], v, atol=2e-6)
    np.testing.assert_allclose(out["x0_from_v"], x0, atol=2e-6)
    np.testing.assert_allclose(out["eps_from_v"], eps, atol=2e-6)
    # Dividing by sqrt(abar) (>= 6e-3) or sqrt(1 - abar) (>= 1e-2) amplifies the
    # float32 error of x_t (~5e-7) by at most ~200.
    np.testing.assert_allclose(out["x0_from_eps"], x0, atol=1e-4)
    np.testing.assert_allclose(out["eps_from_x0"], eps, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_dispatch(schedule, prediction):
    rows = np.array([3, 400, 999])
    rng = np.random.default_rng(4)
    x0, eps = rng.uniform(-1, 1, (3, 5)), rng.standard_normal((3, 5))
    a, s = np.sqrt(ABAR[rows])[:, None], np.sqrt(1 - ABAR[rows])[:, None]
    x_t = a * x0 + s * eps
    target = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
    t, j = jnp.asarray(rows), (lambda z: jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(f64(dj.prediction_target(schedule, prediction, j(x0), j(eps), t)), target, atol=2e-6)
    np.testing.assert_allclose(f64(dj.x0_from_prediction(schedule, prediction, j(x_t), t, j(target))), x0, atol=1e-4)
    np.testing.assert_allclose(f64(dj.eps_from_prediction(schedule, prediction, j(x_t), t, j(target))), eps, atol=1e-4)


# --- p_theta(x_{t-1} | x_t) -----------------------------------------------------------


ROWS = np.array([0, 1, 7, 300, 999])


def perfect_outputs(rows, seed=5):
    rng = np.random.default_rng(seed)
    x0, eps = rng.uniform(-0.9, 0.9, (len(rows), 3, 2)), rng.standard_normal((len(rows), 3, 2))
    a = np.sqrt(ABAR[rows])[:, None, None]
    s = np.sqrt(1 - ABAR[rows])[:, None, None]
    return x0, eps, a * x0 + s * eps, a * eps - s * x0


def post_var(row):
    return BETAS[row] * (1 - ABAR_PREV[row]) / (1 - ABAR[row])


def test_fixed_variances(schedule):
    x0, eps, x_t, _ = perfect_outputs(ROWS)
    t = jnp.asarray(ROWS)
    pmv = jax.jit(dj.p_mean_variance, static_argnames=("prediction", "variance", "clip_denoised"))
    small = pmv(schedule, jnp.asarray(eps, jnp.float32), jnp.asarray(x_t, jnp.float32), t, variance="fixed_small")
    large = pmv(schedule, jnp.asarray(eps, jnp.float32), jnp.asarray(x_t, jnp.float32), t, variance="fixed_large")
    ref_small = np.array([post_var(1)] + [post_var(r) for r in ROWS[1:]])  # row 0 clipped to row 1
    ref_large = np.array([post_var(1)] + [BETAS[r] for r in ROWS[1:]])  # beta_t, row 0 -> tilde-beta_1
    for out, ref in [(small, ref_small), (large, ref_large)]:
        np.testing.assert_allclose(f64(out.variance), np.broadcast_to(ref[:, None, None], x_t.shape), rtol=1e-5)
        np.testing.assert_allclose(
            f64(out.log_variance), np.broadcast_to(np.log(ref)[:, None, None], x_t.shape), atol=1e-5
        )
    # Same mean either way: the variance choice does not touch it.
    np.testing.assert_array_equal(np.asarray(small.mean), np.asarray(large.mean))


@pytest.mark.parametrize("v_value,frac", [(1.0, 1.0), (-1.0, 0.0), (0.0, 0.5), (0.5, 0.75)])
def test_learned_range_interpolates_log_variances(schedule, v_value, frac):
    """Nichol & Dhariwal 2021 eq. 15: log Sigma = u log beta_t + (1 - u) log tilde-beta_t, u = (v + 1) / 2."""
    x0, eps, x_t, _ = perfect_outputs(ROWS)
    output = np.concatenate([eps, np.full_like(eps, v_value)], axis=-1)
    out = jax.jit(lambda o, x: dj.p_mean_variance(schedule, o, x, jnp.asarray(ROWS), variance="learned_range"))(
        jnp.asarray(output, jnp.float32), jnp.asarray(x_t, jnp.float32)
    )
    log_beta = np.log(BETAS[ROWS])
    log_post = np.log([post_var(max(r, 1)) for r in ROWS])  # clipped at row 0
    ref = frac * log_beta + (1 - frac) * log_post
    np.testing.assert_allclose(f64(out.log_variance), np.broadcast_to(ref[:, None, None], x_t.shape), atol=1e-5)
    np.testing.assert_allclose(f64(out.variance), np.exp(f64(out.log_variance)), rtol=1e-6)
    # The prediction channels are the first C: the mean is the true posterior mean.
    ref_mean = np.stack([reference_posterior(x0[i], x_t[i], r)[0] for i, r in enumerate(ROWS)])
    np.testing.assert_allclose(f64(out.mean), ref_mean, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip_denoised", [True, False])
def test_perfect_prediction_gives_the_true_posterior_mean(schedule, prediction, clip_denoised):
    x0, eps, x_t, v = perfect_outputs(ROWS)
    pred = {"eps": eps, "x0": x0, "v": v}[prediction]
    out = jax.jit(
        lambda p, x: dj.p_mean_variance(
            schedule, p, x, jnp.asarray(ROWS), prediction=prediction, clip_denoised=clip_denoised
        )
    )(jnp.asarray(pred, jnp.float32), jnp.asarray(x_t, jnp.float32))
    ref_mean = np.stack([reference_posterior(x0[i], x_t[i], r)[0] for i, r in enumerate(ROWS)])
    # x0 recovered from eps divides by sqrt(abar_999) = 6e-3 (error ~1e-4), but its
    # posterior coefficient sqrt(abar_{t-1}) beta_t / (1 - abar_t) is <= 1.
    np.testing.assert_allclose(f64(out.pred_x0), x0, atol=1e-4)
    np.testing.assert_allclose(f64(out.mean), ref_mean, atol=1e-4)


def test_clip_denoised_clips_predicted_x0(schedule):
    rows = np.array([10, 10])
    x0 = np.array([[1.5, -2.0, 0.3], [0.9, -0.9, 3.0]])
    eps = np.random.default_rng(6).standard_normal(x0.shape)
    a, s = np.sqrt(ABAR[10]), np.sqrt(1 - ABAR[10])
    x_t = a * x0 + s * eps
    j = lambda z: jnp.asarray(z, jnp.float32)  # noqa: E731
    out = dj.p_mean_variance(schedule, j(eps), j(x_t), jnp.asarray(rows), clip_denoised=True)
    np.testing.assert_allclose(f64(out.pred_x0), np.clip(x0, -1, 1), atol=1e-5)
    ref_mean = reference_posterior(np.clip(x0, -1, 1), x_t, 10)[0]
    np.testing.assert_allclose(f64(out.mean), ref_mean, atol=1e-5)
    unclipped = dj.p_mean_variance(schedule, j(eps), j(x_t), jnp.asarray(rows), clip_denoised=False)
    np.testing.assert_allclose(f64(unclipped.pred_x0), x0, atol=1e-5)


# --- jit and vmap ----------------------------------------------------------------------


def test_vmap_over_a_leading_axis_equals_the_batched_call(schedule):
    """A per-batch function vmapped over [N, B, ...] equals one call on [N*B, ...]."""
    n, b, shape = 3, 4, (5, 2)
    x0, noise = batch(7, (n, b) + shape), batch(8, (n, b) + shape)
    t = jnp.asarray(np.random.default_rng(9).integers(0, T, (n, b)), jnp.int32)
    out_channels = batch(10, (n, b) + shape[:-1] + (4,))  # learned_range: 2C channels

    def per_batch(x0, t, noise, output):
        x_t = dj.q_sample(schedule, x0, t, noise)
        p = dj.p_mean_variance(schedule, output, x_t, t, variance="learned_range", prediction="v")
        return x_t, p.mean, p.log_variance

    vmapped = jax.jit(jax.vmap(per_batch))(x0, t, noise, out_channels)
    flat = lambda z: z.reshape((n * b,) + z.shape[2:])  # noqa: E731
    batched = jax.jit(per_batch)(flat(x0), flat(t), flat(noise), flat(out_channels))
    for v_out, b_out in zip(vmapped, batched, strict=True):
        np.testing.assert_allclose(f64(flat(v_out)), f64(b_out), rtol=1e-6, atol=1e-7)


def test_jitted_equals_eager(schedule):
    x0, noise = batch(11, (4, 3)), batch(12, (4, 3))
    t = jnp.array([0, 5, 600, 999])
    eager = dj.p_mean_variance(schedule, noise, dj.q_sample(schedule, x0, t, noise), t, variance="fixed_large")
    jitted = jax.jit(
        lambda x0, noise: dj.p_mean_variance(
            schedule, noise, dj.q_sample(schedule, x0, t, noise), t, variance="fixed_large"
        )
    )(x0, noise)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted), strict=True):
        np.testing.assert_allclose(f64(a), f64(b), rtol=1e-6, atol=1e-7)


def test_jitted_sample_depends_on_the_key_only():
    schedule = dj.make_schedule("linear", 50)

    def model_fn(x, t):
        return 0.5 * x + 0.01 * t[:, None].astype(jnp.float32)

    run = jax.jit(lambda key: dj.sample(model_fn, schedule, (8, 3), key, sampler="ddpm", clip_denoised=False))
    a, b, c = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.all(np.isfinite(np.asarray(a)))
    # Independent draws: almost surely no coordinate coincides.
    assert np.min(np.abs(np.asarray(a) - np.asarray(c))) > 0
