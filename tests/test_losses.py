"""Bound terms, training losses and importance sampling of timesteps, against
closed forms and hand computations (Ho et al. 2020 eqs. 5, 13-14; Nichol &
Dhariwal 2021 secs. 3.1, 3.3; Hang et al. 2023), references in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj

T = 1000
EPS32 = float(np.finfo(np.float32).eps)
LOG2 = math.log(2.0)
BETAS = np.linspace(1e-4, 0.02, T)
ABAR = np.cumprod(1 - BETAS)
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])
BIN = 1.0 / 255.0


@pytest.fixture(scope="module")
def schedule():
    return dj.make_schedule("linear", T)


def f64(x):
    return np.asarray(x, np.float64)


def j32(x):
    return jnp.asarray(x, jnp.float32)


# --- Float64 references -----------------------------------------------------------


def Phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def log_bin_probability(x, mean, scale):
    """log P(bin of x) for N(mean, scale^2) discretized to the 8-bit grid (Ho et al. eq. 13), by erf."""
    hi, lo = (x - mean + BIN) / scale, (x - mean - BIN) / scale
    if x < -0.999:
        return math.log(Phi(hi))
    if x > 0.999:
        return math.log(0.5 * math.erfc(lo / math.sqrt(2.0)))  # 1 - Phi(lo), accurate in the tail
    if lo > 0:  # both in the upper tail: subtract upper-tail masses instead
        return math.log(0.5 * (math.erfc(lo / math.sqrt(2.0)) - math.erfc(hi / math.sqrt(2.0))))
    return math.log(Phi(hi) - Phi(lo))


def kl_gauss(m1, v1, m2, v2):
    """Textbook KL(N(m1, v1) || N(m2, v2)) in nats."""
    return 0.5 * np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def post_var(row):
    return BETAS[row] * (1 - ABAR_PREV[row]) / (1 - ABAR[row])


def posterior_mean(x0, x_t, row):
    """Mean of q(x_{t-1} | x_t, x_0) by completing the square (row 0: x_0 itself)."""
    if row == 0:
        return x0
    beta, abar_prev = BETAS[row], ABAR_PREV[row]
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    return (np.sqrt(1 - beta) * x_t / beta + np.sqrt(abar_prev) * x0 / (1 - abar_prev)) / precision


def reference_vlb_term(row, x0, x_t, eps_hat, variance="fixed_small", clip=False):
    """One bound term in bits/dim for an eps-prediction, written from Ho et al. eqs. 5, 7, 12, 13.

    Returns ``(value, tol)``: ``tol`` propagates float32 rounding of the two
    Gaussian means (a few eps32 of the largest term in each, and x_0-hat divided
    by sqrt(abar_t)) through the KL's (mean difference)^2 / (2 variance); for the
    decoder term it is a relative 1e-4 (a mean error ~1e-7 against scales >= 7e-3).
    """
    a, s = np.sqrt(ABAR[row]), np.sqrt(1 - ABAR[row])
    x0_hat = (x_t - s * eps_hat) / a
    if clip:
        x0_hat = np.clip(x0_hat, -1, 1)
    model_mean = posterior_mean(x0_hat, x_t, row)
    if variance == "fixed_small":
        model_var = post_var(max(row, 1))
    else:  # fixed_large
        model_var = post_var(1) if row == 0 else BETAS[row]
    if row == 0:
        scale = math.sqrt(model_var)
        logp = [log_bin_probability(x, m, scale) for x, m in zip(x0.ravel(), model_mean.ravel(), strict=True)]
        value = -np.mean(logp) / LOG2
        return value, 1e-4 * abs(value) + 1e-6
    true_mean = posterior_mean(x0, x_t, row)
    kl = kl_gauss(true_mean, post_var(row), model_mean, model_var)
    coef1 = np.sqrt(ABAR_PREV[row]) * BETAS[row] / (1 - ABAR[row])
    delta = (
        4
        * EPS32
        * (np.abs(true_mean) + np.abs(model_mean) + np.abs(x_t) + coef1 * (np.abs(x_t) + s * np.abs(eps_hat)) / a)
    )
    dm = np.abs(true_mean - model_mean)
    kl_tol = (2 * dm * delta + delta**2) / (2 * model_var) + 4 * EPS32 * (1 + np.abs(kl))
    return np.mean(kl) / LOG2, np.mean(kl_tol) / LOG2


def grid_data(rng, shape):
    """Data on the 8-bit grid, both extreme bins included."""
    k = rng.integers(0, 256, shape)
    k.flat[0], k.flat[1] = 0, 255
    return 2 * k / 255 - 1


# --- Gaussian KL ------------------------------------------------------------------


def test_normal_kl_of_identical_gaussians_is_zero():
    m, lv = j32([[0.3, -2.0, 5.0]]), j32([[-3.0, 0.0, 2.5]])
    np.testing.assert_array_equal(np.asarray(jax.jit(dj.normal_kl)(m, lv, m, lv)), 0.0)
    # Generic log-variances: zero up to one ulp of 1 + |lv| (the rounding of -1 + lv).
    rng = np.random.default_rng(1)
    m, lv = j32(rng.normal(size=1000)), j32(rng.uniform(-12, 3, 1000))
    got = f64(jax.jit(dj.normal_kl)(m, lv, m, lv))
    np.testing.assert_array_less(np.abs(got), EPS32 * (1 + np.abs(f64(lv))))


def test_normal_kl_of_identical_gaussians_is_exactly_zero_and_never_negative():
    rng = np.random.default_rng(1)
    m, lv = j32(rng.normal(size=1000)), j32(rng.uniform(-12, 3, 1000))
    np.testing.assert_array_equal(np.asarray(jax.jit(dj.normal_kl)(m, lv, m, lv)), 0.0)


def test_normal_kl_matches_numerical_integration():
    """KL = integral of p log(p / q) on a fine grid, for one scalar case."""
    m1, v1, m2, v2 = 0.3, 0.5**2, -0.4, 1.2**2
    x = np.linspace(m1 - 12 * math.sqrt(v1), m1 + 12 * math.sqrt(v1), 200_001)
    log_p = -0.5 * np.log(2 * np.pi * v1) - (x - m1) ** 2 / (2 * v1)
    log_q = -0.5 * np.log(2 * np.pi * v2) - (x - m2) ** 2 / (2 * v2)
    integral = np.trapezoid(np.exp(log_p) * (log_p - log_q), x)
    got = float(jax.jit(dj.normal_kl)(j32(m1), j32(math.log(v1)), j32(m2), j32(math.log(v2))))
    np.testing.assert_allclose(got, integral, rtol=1e-5)


def test_normal_kl_matches_textbook_formula_and_broadcasts():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    lv1, lv2 = rng.uniform(-4, 2, (4, 3)), rng.uniform(-4, 2, (1, 3))
    got = f64(jax.jit(dj.normal_kl)(j32(m1), j32(lv1), j32(m2), j32(lv2)))
    ref = kl_gauss(m1, np.exp(lv1), m2, np.exp(lv2))
    assert got.shape == (4, 3)
    # exp(lv1 - lv2) up to e^6 in float32: relative error a few eps32 of the largest term.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref)))
    assert np.all(got >= 0)


# --- Discretized Gaussian decoder --------------------------------------------------------

GRID = 2 * np.arange(256) / 255 - 1


@pytest.mark.parametrize("mean", [-3.0, -1.0, -0.3, 0.0, 0.5037, 1.0, 1.5])
@pytest.mark.parametrize("scale", [1e-3, 0.02, 0.3, 1.0, 5.0])
def test_decoder_probabilities_sum_to_one(mean, scale):
    ll = jax.jit(dj.discretized_gaussian_log_likelihood)(
        j32(GRID), means=j32(np.full(256, mean)), log_scales=j32(np.full(256, math.log(scale)))
    )
    total = np.sum(np.exp(f64(ll)))
    # Float32 error bound: a bin narrow against the scale (width 2/255 << scale) loses
    # digits in Phi(hi) - Phi(lo), relative eps32 * scale / width; a scale narrow against
    # float32 rounding of the bin edges (~eps32) moves mass ~ eps32 / scale.
    tol = 8 * EPS32 * (1 + scale / (2 * BIN) + 1 / scale)
    assert abs(total - 1) < tol, (total, tol)


def test_decoder_puts_bfloat16_data_back_on_the_grid():
    """bfloat16 holds 2k/255 - 1 only to ~0.24 of a bin: the bins must be those of the 8-bit
    values the data stands for, as for the same data in float32."""
    rng = np.random.default_rng(0)
    k = rng.integers(0, 256, 512)
    x32 = j32(2 * k / 255 - 1)
    x16 = x32.astype(jnp.bfloat16)
    assert np.abs(f64(x16) - f64(x32)).max() * 127.5 > 0.1  # off the grid by a tenth of a bin
    means, log_scales = j32(f64(x32) + rng.normal(0, 0.03, 512)), j32(np.full(512, math.log(0.02)))
    got = dj.discretized_gaussian_log_likelihood(x16, means=means, log_scales=log_scales)
    expected = [log_bin_probability(np.float32(x), np.float32(m), 0.02) for x, m in zip(f64(x32), f64(means))]
    np.testing.assert_allclose(f64(got), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "x,mean,scale",
    [
        (2 * 100 / 255 - 1, 0.1, 0.05),  # interior bin, centre region
        (2 * 128 / 255 - 1, 0.0, 0.01),  # interior, scale about one bin width
        (2 * 240 / 255 - 1, -0.9, 0.05),  # interior, 36 sigma in the upper tail
        (2 * 10 / 255 - 1, 0.8, 0.06),  # interior, deep lower tail
        (-1.0, -0.98, 0.05),  # lowest bin: (-inf, -1 + 1/255]
        (-1.0, 0.5, 0.1),  # lowest bin, far tail
        (1.0, 0.97, 0.05),  # highest bin: [1 - 1/255, inf)
        (1.0, 0.0, 0.1),  # highest bin, far tail (Phi(-9.96) ~ 1e-23)
    ],
)
def test_decoder_bin_is_a_phi_difference_with_tails_at_the_edges(x, mean, scale):
    ll = float(
        jax.jit(dj.discretized_gaussian_log_likelihood)(j32([x]), means=j32([mean]), log_scales=j32([math.log(scale)]))[
            0
        ]
    )
    ref = log_bin_probability(np.float32(x), np.float32(mean), scale)
    # float32 inputs: relative error of log P a few eps32 times |z|^2 in the deep tails.
    np.testing.assert_allclose(ll, ref, rtol=1e-4, atol=1e-5)


def test_edge_bins_are_tails_not_bins():
    """The lowest bin is Phi(hi), not Phi(hi) - Phi(lo): different when lo is not far out."""
    mean, scale = -1.0, 0.02
    ll = float(
        dj.discretized_gaussian_log_likelihood(j32([-1.0]), means=j32([mean]), log_scales=j32([math.log(scale)]))[0]
    )
    as_tail = math.log(Phi(BIN / scale))
    as_bin = math.log(Phi(BIN / scale) - Phi(-BIN / scale))
    np.testing.assert_allclose(ll, as_tail, rtol=1e-5)
    assert abs(as_tail - as_bin) > 0.3


# --- Bound terms ---------------------------------------------------------------------------


def vlb_inputs(rows, seed, shape=(4, 3)):
    rng = np.random.default_rng(seed)
    x0 = grid_data(rng, (len(rows),) + shape)
    noise = rng.standard_normal(x0.shape)
    a, s = np.sqrt(ABAR[rows]), np.sqrt(1 - ABAR[rows])
    x_t = a.reshape(-1, 1, 1) * x0 + s.reshape(-1, 1, 1) * noise
    eps_hat = noise + 0.3 * rng.standard_normal(x0.shape)  # an imperfect model
    return x0, x_t, eps_hat


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
def test_vlb_term_is_decoder_nll_at_t0_and_kl_elsewhere(schedule, variance, clip):
    rows = np.array([0, 0, 1, 2, 50, 500, 999])
    x0, x_t, eps_hat = vlb_inputs(rows, seed=1)
    got = jax.jit(
        lambda o, x0, x_t: dj.vlb_term(schedule, o, x0, x_t, jnp.asarray(rows), variance=variance, clip_denoised=clip)
    )(j32(eps_hat), j32(x0), j32(x_t))
    assert got.shape == (len(rows),)
    ref, tol = zip(
        *[reference_vlb_term(r, x0[i], x_t[i], eps_hat[i], variance, clip) for i, r in enumerate(rows)], strict=True
    )
    np.testing.assert_array_less(np.abs(f64(got) - ref), tol)
    assert np.all(f64(got) > 0)


def test_vlb_term_is_zero_for_a_perfect_model_at_t_above_0(schedule):
    rows = np.array([1, 10, 400, 999])
    rng = np.random.default_rng(2)
    x0, noise = rng.uniform(-1, 1, (4, 6)), rng.standard_normal((4, 6))
    a, s = np.sqrt(ABAR[rows])[:, None], np.sqrt(1 - ABAR[rows])[:, None]
    x_t = a * x0 + s * noise
    got = f64(dj.vlb_term(schedule, j32(noise), j32(x0), j32(x_t), jnp.asarray(rows), clip_denoised=False))
    # Mean error ~1e-7 from float32 over a posterior variance >= 5e-5 gives ~1e-10 bits; what is
    # left is normal_kl's rounding of -1 + lv, half an ulp of 1 + |lv| <= 11: 3.4e-7 bits.
    np.testing.assert_array_less(np.abs(got), 1e-6)


@pytest.mark.parametrize("beta_end", [0.02, 1e-3])
def test_prior_bpd_closed_form(beta_end):
    sched = dj.make_schedule("linear", T, beta_end=beta_end)
    abar_T = np.prod(1 - np.linspace(1e-4, beta_end, T))
    x0 = grid_data(np.random.default_rng(3), (3, 4, 2))
    got = f64(jax.jit(dj.prior_bpd)(sched, j32(x0)))
    # KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), averaged over dimensions, in bits.
    kl = 0.5 * (-1 - np.log(1 - abar_T) + (1 - abar_T) + abar_T * x0**2)
    ref = kl.reshape(3, -1).mean(1) / LOG2
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)
    if beta_end == 0.02:
        assert np.all(got < 1e-4)
    else:
        assert np.all(got > 0.1)  # abar_T = 0.58: far from N(0, I)


# --- Training losses ------------------------------------------------------------------------


def loss_inputs(batch=5, shape=(4, 2), seed=4):
    rng = np.random.default_rng(seed)
    x0 = j32(rng.uniform(-1, 1, (batch,) + shape))
    noise = j32(rng.standard_normal((batch,) + shape))
    t = jnp.asarray(rng.integers(0, T, batch), jnp.int32)
    return x0, noise, t


def v_target(x0, noise, t):
    a = np.sqrt(ABAR[np.asarray(t)]).reshape(-1, 1, 1)
    return a * f64(noise) - np.sqrt(1 - a**2) * f64(x0)


def per_example_mean(x):
    return x.reshape(x.shape[0], -1).mean(1)


def test_simple_loss_is_zero_for_the_exact_noise(schedule):
    x0, noise, t = loss_inputs()
    out = jax.jit(lambda x0, n: dj.training_losses(lambda x, ts: n, schedule, x0, t, n))(x0, noise)
    np.testing.assert_array_equal(np.asarray(out.loss), 0.0)
    assert out.loss.shape == (5,)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_simple_loss_with_zero_model_is_the_mean_squared_target(schedule, prediction):
    x0, noise, t = loss_inputs()
    out = jax.jit(
        lambda x0, n: dj.training_losses(lambda x, ts: jnp.zeros_like(x), schedule, x0, t, n, prediction=prediction)
    )(x0, noise)
    target = {"eps": f64(noise), "x0": f64(x0), "v": v_target(x0, noise, t)}[prediction]
    np.testing.assert_allclose(f64(out.loss), per_example_mean(target**2), rtol=1e-5)
    np.testing.assert_allclose(f64(out.mse), f64(out.loss), rtol=0)
    np.testing.assert_array_equal(np.asarray(out.vlb), 0.0)
    np.testing.assert_array_equal(np.asarray(out.prior), 0.0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_by_hand(schedule, prediction, gamma):
    rows = np.array([0, 100, 200, 300, 500, 999])  # SNR from 1e4 down to 4e-5, crossing gamma
    snr = ABAR[rows] / (1 - ABAR[rows])
    assert snr.min() < gamma < snr.max()
    clipped = np.minimum(snr, gamma)
    ref = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[prediction]
    got = jax.jit(lambda t: dj.min_snr_weight(schedule, t, gamma=gamma, prediction=prediction))(jnp.asarray(rows))
    np.testing.assert_allclose(f64(got), ref, rtol=1e-5)

    x0, noise, _ = loss_inputs(batch=len(rows))
    t = jnp.asarray(rows)
    out = dj.training_losses(
        lambda x, ts: jnp.zeros_like(x), schedule, x0, t, noise, prediction=prediction, min_snr_gamma=gamma
    )
    target = {"eps": f64(noise), "x0": f64(x0), "v": v_target(x0, noise, t)}[prediction]
    np.testing.assert_allclose(f64(out.loss), ref * per_example_mean(target**2), rtol=1e-5)


def test_vlb_loss_is_T_times_the_bound_term(schedule):
    rows = np.array([0, 1, 3, 250, 999])
    rng = np.random.default_rng(5)
    x0 = grid_data(rng, (5, 4, 3))
    noise = rng.standard_normal(x0.shape)
    eps_hat = 0.8 * noise + 0.05
    out = jax.jit(
        lambda x0, n: dj.training_losses(lambda x, ts: 0.8 * n + 0.05, schedule, x0, jnp.asarray(rows), n, loss="vlb")
    )(j32(x0), j32(noise))
    a, s = np.sqrt(ABAR[rows]).reshape(-1, 1, 1), np.sqrt(1 - ABAR[rows]).reshape(-1, 1, 1)
    x_t = a * f64(j32(x0)) + s * f64(j32(noise))
    ref, tol = zip(
        *[reference_vlb_term(r, x0[i], x_t[i], eps_hat[i], clip=False) for i, r in enumerate(rows)], strict=True
    )
    np.testing.assert_array_less(np.abs(f64(out.vlb) - T * np.array(ref)), T * np.array(tol))
    # L_T by its closed form (about 1e-5 bits here; see the next test where it is large).
    prior = prior_closed_form(ABAR[-1], x0)
    np.testing.assert_allclose(f64(out.prior), prior, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(f64(out.loss), f64(out.vlb) + prior, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.mse), 0.0)


def prior_closed_form(abar_T, x0):
    """KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) averaged over dimensions, in bits, per example."""
    kl = 0.5 * (-1 - np.log(1 - abar_T) + (1 - abar_T) + abar_T * np.asarray(x0, np.float64) ** 2)
    return kl.reshape(len(kl), -1).mean(1) / LOG2


@pytest.mark.parametrize("loss", ["vlb", "hybrid"])
def test_bound_losses_average_over_t_to_the_full_bound(loss):
    """E_t[loss] over uniform t is the whole bound L_T + sum_t L_t (Ho et al. eq. 5), as
    `nll_bpd` evaluates it: here on a short schedule that ends far from N(0, I), so
    that leaving L_T out would miss by more than 0.1 bits/dim."""
    steps = 8
    sched = dj.make_schedule("linear", steps, beta_end=1e-3)  # betas 0.0125 .. 0.125, abar_T = 0.56
    rng = np.random.default_rng(11)
    x0 = j32(grid_data(rng, (3, 4, 2)))
    key = jax.random.PRNGKey(4)

    def model_fn(x, ts):  # fixed and imperfect, depending on t
        return 0.5 * x + 0.01 * ts.astype(jnp.float32)[:, None, None]

    nll = dj.nll_bpd(model_fn, sched, x0, key, clip_denoised=False)
    assert np.all(f64(nll.prior) > 0.1)
    per_row = []
    for row in range(steps):  # the noise nll_bpd draws at each row
        noise = jax.random.normal(jax.random.fold_in(key, row), x0.shape, x0.dtype)
        t = jnp.full((3,), row, jnp.int32)
        out = dj.training_losses(model_fn, sched, x0, t, noise, loss=loss)
        per_row.append(f64(out.loss) if loss == "vlb" else (f64(out.loss) - f64(out.mse)) / 0.001)
    np.testing.assert_allclose(np.mean(per_row, axis=0), f64(nll.total), rtol=1e-5)


def test_hybrid_loss_trains_only_the_variance_through_the_bound(schedule):
    """Nichol & Dhariwal 2021 sec. 3.1: stop-gradient on the mean in L_vlb."""
    x0, noise, _ = loss_inputs(batch=4, shape=(3, 2))
    t = jnp.array([1, 40, 300, 900])
    rng = np.random.default_rng(6)
    params = j32(rng.normal(size=(4, 3, 4)) * 0.5)  # [prediction (2) | v (2)]

    def losses(p, loss):
        return dj.training_losses(lambda x, ts: p, schedule, x0, t, noise, loss=loss, variance="learned_range")

    grad_vlb_in_hybrid = jax.jit(jax.grad(lambda p: jnp.sum(losses(p, "hybrid").vlb)))(params)
    np.testing.assert_array_equal(np.asarray(grad_vlb_in_hybrid[..., :2]), 0.0)
    assert np.all(np.abs(f64(grad_vlb_in_hybrid[..., 2:])) > 0)

    # Without the stop-gradient (loss="vlb") the mean channels do get gradient.
    grad_vlb = jax.jit(jax.grad(lambda p: jnp.sum(losses(p, "vlb").vlb)))(params)
    assert np.all(np.abs(f64(grad_vlb[..., :2])) > 0)

    # The hybrid loss's gradient on the mean channels is the simple loss's:
    # d/dp mean_d (eps - p)^2 = -2 (eps - p) / D with D = 3 * 2.
    grad_hybrid = jax.jit(jax.grad(lambda p: jnp.sum(losses(p, "hybrid").loss)))(params)
    np.testing.assert_allclose(
        f64(grad_hybrid[..., :2]), -2 * (f64(noise) - f64(params[..., :2])) / 6, rtol=1e-5, atol=4 * EPS32
    )
    var_grad = 0.001 * f64(grad_vlb_in_hybrid[..., 2:])
    np.testing.assert_allclose(f64(grad_hybrid[..., 2:]), var_grad, rtol=1e-5, atol=1e-5 * np.max(np.abs(var_grad)))

    out = losses(params, "hybrid")
    prior = 0.001 * prior_closed_form(ABAR[-1], x0)
    np.testing.assert_allclose(f64(out.prior), prior, rtol=1e-3, atol=1e-12)
    np.testing.assert_allclose(f64(out.loss), f64(out.mse) + 0.001 * f64(out.vlb) + prior, rtol=1e-6)


def test_loss_shapes_for_every_combination(schedule):
    x0, noise, t = loss_inputs(batch=3, shape=(2, 2, 1))
    for loss in ("simple", "vlb", "hybrid"):
        for prediction in ("eps", "x0", "v"):
            for variance in ("fixed_small", "fixed_large", "learned_range"):
                c = 2 if variance == "learned_range" else 1
                out = dj.training_losses(
                    lambda x, ts, c=c: jnp.concatenate([0.5 * x] * c, axis=-1),
                    schedule,
                    x0,
                    t,
                    noise,
                    loss=loss,
                    prediction=prediction,
                    variance=variance,
                )
                for field in (out.loss, out.mse, out.vlb, out.prior):
                    assert field.shape == (3,) and field.dtype == jnp.float32
                    assert np.all(np.isfinite(np.asarray(field)))


def test_model_is_called_with_original_timesteps():
    base = dj.make_schedule("linear", T)
    spaced = dj.respace(base, [0, 10, 500, 999])
    seen = []

    def model_fn(x, ts):
        seen.append(ts)
        return jnp.zeros_like(x)

    x0, noise, _ = loss_inputs(batch=4)
    dj.training_losses(model_fn, spaced, x0, jnp.array([0, 1, 2, 3]), noise)
    np.testing.assert_array_equal(np.asarray(seen[0]), [0, 10, 500, 999])


def test_vmap_over_a_leading_axis_equals_the_batched_call(schedule):
    n, b = 3, 4
    rng = np.random.default_rng(7)
    x0 = j32(grid_data(rng, (n, b, 3, 2)))
    noise = j32(rng.standard_normal((n, b, 3, 2)))
    out = j32(rng.normal(size=(n, b, 3, 4)))
    t = jnp.asarray(rng.integers(0, T, (n, b)), jnp.int32)

    def per_batch(x0, noise, out, t):
        x_t = dj.q_sample(schedule, x0, t, noise)
        term = dj.vlb_term(schedule, out, x0, x_t, t, variance="learned_range")
        losses = dj.training_losses(lambda x, ts: out, schedule, x0, t, noise, loss="hybrid", variance="learned_range")
        return term, losses.loss, losses.vlb

    flat = lambda z: z.reshape((n * b,) + z.shape[2:])  # noqa: E731
    vmapped = jax.jit(jax.vmap(per_batch))(x0, noise, out, t)
    batched = jax.jit(per_batch)(flat(x0), flat(noise), flat(out), flat(t))
    for v_out, b_out in zip(vmapped, batched, strict=True):
        np.testing.assert_allclose(f64(flat(v_out)), f64(b_out), rtol=1e-5)


# --- Importance sampling of timesteps -------------------------------------------------------


def test_history_is_uniform_until_every_timestep_has_K_losses():
    h = dj.init_loss_history(4, 2)
    h = dj.update_loss_history(h, jnp.array([0, 1, 2, 3, 0, 1, 2]), j32([1, 2, 3, 4, 5, 6, 7]))
    np.testing.assert_array_equal(np.asarray(h.counts), [2, 2, 2, 1])
    np.testing.assert_allclose(f64(dj.timestep_probs(h, uniform_prob=0.1)), 0.25)
    t, w = dj.sample_timesteps(jax.random.PRNGKey(0), 64, 4, h)
    np.testing.assert_allclose(f64(w), 1.0, rtol=1e-6)

    h = dj.update_loss_history(h, jnp.array([3]), j32([8]))
    p = f64(jax.jit(lambda h: dj.timestep_probs(h, uniform_prob=0.1))(h))
    # Rows hold {1, 5}, {2, 6}, {3, 7}, {4, 8}: p_t ∝ sqrt(mean L^2), mixed with 10% uniform.
    rms = np.sqrt([(1 + 25) / 2, (4 + 36) / 2, (9 + 49) / 2, (16 + 64) / 2])
    expected = 0.9 * rms / rms.sum() + 0.1 / 4
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    assert abs(p.sum() - 1) < 1e-6


def test_history_ring_buffer_keeps_the_last_K_per_timestep():
    h = dj.init_loss_history(4, 2)
    # Duplicates in one batch are recorded in order: row 1 sees 1, 2, 3 and keeps 2 and 3.
    h = dj.update_loss_history(h, jnp.array([1, 1, 2, 1]), j32([1.0, 2.0, 9.0, 3.0]))
    losses = np.asarray(h.losses)
    assert sorted(losses[1].tolist()) == [2.0, 3.0]
    np.testing.assert_array_equal(np.asarray(h.counts), [0, 3, 1, 0])
    assert 9.0 in losses[2].tolist()
    np.testing.assert_array_equal(losses[[0, 3]], 0.0)
    h = jax.jit(dj.update_loss_history)(h, jnp.array([1, 1]), j32([4.0, 5.0]))
    assert sorted(np.asarray(h.losses)[1].tolist()) == [4.0, 5.0]


def warm_history():
    h = dj.init_loss_history(4, 2)
    return dj.update_loss_history(h, jnp.array([0, 1, 2, 3, 0, 1, 2, 3]), j32([1, 2, 3, 4, 1, 2, 3, 4]))


def test_sampled_frequencies_match_p_and_weights_are_inverse():
    h = warm_history()
    n = 200_000
    p = np.array([1, 2, 3, 4]) / 10 * 0.99 + 0.01 / 4  # rms = 1, 2, 3, 4; uniform_prob = 0.01
    t, w = jax.jit(lambda k: dj.sample_timesteps(k, n, 4, h, uniform_prob=0.01))(jax.random.PRNGKey(1))
    t, w = np.asarray(t), f64(w)
    assert t.shape == (n,) and t.dtype == np.int32 and w.shape == (n,)
    freq = np.bincount(t, minlength=4) / n
    # Binomial standard error per bin; 5 of them.
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n))
    np.testing.assert_allclose(w, 1 / (4 * p[t]), rtol=1e-5)


def test_importance_weights_keep_the_loss_unbiased():
    """E_{t~p}[w_t L_t] = (1/T) sum_t L_t exactly, for the weights the sampler returns."""
    h = warm_history()
    losses = np.array([0.3, 5.0, 1.0, 2.5])
    p = f64(dj.timestep_probs(h, uniform_prob=0.2))
    t, w = dj.sample_timesteps(jax.random.PRNGKey(2), 4000, 4, h, uniform_prob=0.2)
    t, w = np.asarray(t), f64(w)
    weight_of = {}
    for ti, wi in zip(t, w, strict=True):
        weight_of.setdefault(int(ti), wi)
        assert wi == weight_of[int(ti)]
    assert sorted(weight_of) == [0, 1, 2, 3]
    weighted = sum(p[k] * weight_of[k] * losses[k] for k in range(4))
    np.testing.assert_allclose(weighted, losses.mean(), rtol=1e-6)


def test_uniform_sampling_without_history():
    t, w = jax.jit(lambda k: dj.sample_timesteps(k, 100_000, 7))(jax.random.PRNGKey(3))
    t = np.asarray(t)
    assert t.min() == 0 and t.max() == 6
    np.testing.assert_array_equal(np.asarray(w), 1.0)
    freq = np.bincount(t, minlength=7) / t.size
    np.testing.assert_array_less(np.abs(freq - 1 / 7), 5 * np.sqrt((1 / 7) * (6 / 7) / t.size))
