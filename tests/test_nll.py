"""The full variational bound (Ho et al. 2020 eq. 5) with the exact optimal model.

Data: K = 4 images of 4x4x1 pixels on the 8-bit grid, any two differing by at
least 2/3 in every pixel. For this data E[x_0 | x_t] is a closed-form softmax
over the images, so every term of the bound is known from theory:

- with fixed_small variance each KL term is (SNR_{t-1} - SNR_t)/2 ||x_0 - x0_hat||^2
  per image (Kingma et al. 2021, the discrete-time diffusion loss), never negative, and at most that
  factor times the squared diameter of the data (x0_hat lies in its convex hull);
- summed over t, it is a Riemann sum of (1/2) int mmse(snr) dsnr, which the
  I-MMSE relation (Guo, Shamai & Verdu 2005) equals I(x_0; x_1) - I(x_0; x_T)
  ~ log K nats; evaluated at the low-SNR end of each step (mmse decreases in
  snr) the sum overshoots, so its expectation is >= log2(K)/D bits/dim;
- the decoder term is exact: the optimal model recovers x_0 at t = 0.
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
BETAS = np.linspace(1e-4, 0.02, T)  # Ho et al. 2020, float64, independent of the library
ABAR = np.cumprod(1 - BETAS)
BIN = 1 / 255

LEVELS = 2 * np.array([0, 85, 170, 255]) / 255 - 1  # -1, -1/3, 1/3, 1 on the 8-bit grid
IMAGES = np.stack([LEVELS[(np.arange(16) + k) % 4].reshape(4, 4, 1) for k in range(4)])  # [K, 4, 4, 1]
K, D = IMAGES.shape[0], IMAGES[0].size
ENTROPY_BPD = math.log2(K) / D


def f64(x):
    return np.asarray(x, np.float64)


def optimal_eps_fn(alphas_cumprod, images=IMAGES):
    """E[eps | x_t] for data uniform on ``images``, indexed by the original timestep."""
    abar_table = jnp.asarray(alphas_cumprod, jnp.float32)
    xs = jnp.asarray(images, jnp.float32).reshape(len(images), -1)  # [K, D]

    def model_fn(x_t, ts):
        abar = abar_table[ts][:, None]  # [B, 1]
        a, s2 = jnp.sqrt(abar), 1.0 - abar
        flat = x_t.reshape(x_t.shape[0], -1)
        dist2 = jnp.sum((flat[:, None, :] - a[:, :, None] * xs[None]) ** 2, axis=-1)  # [B, K]
        weights = jax.nn.softmax(-dist2 / (2 * s2), axis=-1)
        x0_mean = weights @ xs  # E[x_0 | x_t]
        return ((flat - a * x0_mean) / jnp.sqrt(s2)).reshape(x_t.shape)

    return model_fn


@pytest.fixture(scope="module")
def schedule():
    return dj.make_schedule("linear", T)


@pytest.fixture(scope="module")
def nll_runs(schedule):
    """The bound for the K images under 8 noise keys: [8, K] totals and [8, K, T] terms."""
    model_fn = optimal_eps_fn(ABAR)
    x0 = jnp.asarray(IMAGES, jnp.float32)
    run = jax.jit(jax.vmap(lambda key: dj.nll_bpd(model_fn, schedule, x0, key)))
    return run(jax.random.split(jax.random.PRNGKey(0), 8))


def post_var(row, abar=ABAR, betas=BETAS):
    abar_prev = 1.0 if row == 0 else abar[row - 1]
    return betas[row] * (1 - abar_prev) / (1 - abar[row])


def Phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2))


def decoder_bits_exact_mean(scale, images=IMAGES):
    """-log2 p(x_0 | x_1) per dim when the decoder mean is x_0: a centred bin, or a tail at +-1."""
    interior = -math.log2(Phi(BIN / scale) - Phi(-BIN / scale))
    edge = -math.log2(Phi(BIN / scale))
    at_edge = np.abs(images.reshape(len(images), -1)) > 0.999
    return np.where(at_edge, edge, interior).mean(axis=1)


def test_the_data_is_what_the_theory_assumes():
    flat = IMAGES.reshape(K, -1)
    for i in range(K):
        for j in range(i + 1, K):
            assert np.min(np.abs(flat[i] - flat[j])) > 0.6
    assert np.all(np.isclose(np.round((flat + 1) * 255 / 2), (flat + 1) * 255 / 2))
    assert 0 < (np.abs(flat) > 0.999).sum() < flat.size  # both kinds of decoder bin occur


def test_total_is_prior_plus_terms(nll_runs):
    total, prior, terms = f64(nll_runs.total), f64(nll_runs.prior), f64(nll_runs.terms)
    assert terms.shape == (8, K, T) and total.shape == (8, K) and prior.shape == (8, K)
    assert np.all(np.isfinite(terms))
    # float32 summation of 1000 positive terms: relative error <= ~T eps32.
    np.testing.assert_allclose(total, prior + terms.sum(-1), rtol=T * EPS32)
    assert np.all(total > 0)


def test_prior_term_is_the_closed_form_and_tiny(nll_runs):
    abar_T = ABAR[-1]
    kl = 0.5 * (-1 - np.log(1 - abar_T) + (1 - abar_T) + abar_T * IMAGES.reshape(K, -1) ** 2)
    ref = kl.mean(1) / LOG2
    np.testing.assert_allclose(f64(nll_runs.prior), np.broadcast_to(ref, (8, K)), rtol=1e-3, atol=1e-8)
    assert np.all(f64(nll_runs.prior) < 1e-4)


def test_kl_terms_are_never_negative(nll_runs):
    # KL >= 0. With fixed_small both Gaussians have the same log-variance lv, and in
    # float32 normal_kl's (-1 + lv) - lv + exp(0) is off by up to one ulp of 1 + |lv|
    # (|lv| <= |log tilde-beta_1| = 9.8): that is the only negative slack.
    lv_max = abs(math.log(post_var(1)))
    tol = EPS32 * (1 + lv_max) / LOG2
    assert np.all(f64(nll_runs.terms)[..., 1:] >= -tol)


def test_kl_terms_obey_the_convex_hull_bound(nll_runs):
    """KL_t <= (SNR_{t-1} - SNR_t) / 2 * max_k ||x_0 - x_k||^2 / (D ln 2) bits/dim, for any x_t."""
    snr = ABAR / (1 - ABAR)
    flat = IMAGES.reshape(K, -1)
    diam2 = np.max(((flat[:, None] - flat[None]) ** 2).sum(-1), axis=1)  # [K], per true image
    rows = np.arange(1, T)
    factor = 0.5 * (snr[rows - 1] - snr[rows])  # coef1^2 / tilde-beta_t (module docstring)
    bound = factor[None, :] * diam2[:, None] / (D * LOG2)  # [K, T-1]
    # Float32 slack: the means carry ~4 eps32 absolute error delta (|mean| <= 2), which moves
    # (mean difference)^2 / (2 tilde-beta_t); and normal_kl's -1 + lv - lv + 1 is off by up
    # to an ulp of 1 + |lv| (see test_kl_terms_are_never_negative).
    delta = 4 * EPS32 * 2
    pv = np.array([post_var(r) for r in rows])
    slack = (2 * np.sqrt(diam2[:, None] * factor[None] / pv[None]) * delta + delta**2 / pv[None]) / (2 * LOG2)
    slack = slack + EPS32 * (1 + np.abs(np.log(pv)))[None] / LOG2
    terms = f64(nll_runs.terms)[..., 1:]
    np.testing.assert_array_less(terms, np.broadcast_to(bound + slack, terms.shape))
    # So the last rows, where x_T has all but forgotten x_0, carry almost nothing:
    assert np.all(bound[:, -50:] < 2e-4)
    assert np.all(terms[..., -50:].sum(-1) < (bound + slack)[:, -50:].sum(-1))


def test_kl_terms_vanish_where_the_image_is_identified(nll_runs):
    """Where sigma_t <= 0.1 the image is identified, and the KL is float32 rounding only.

    Another image x_k is less likely by (a^2 |Delta|^2 - 2 a sigma <n, Delta>) / (2 sigma^2)
    nats, with |Delta|^2 >= 16 (2/3)^2 = 7.1: over 200 nats even for a 5-sigma noise
    projection. So x0_hat = x_0 to ~1e-7 and (SNR_{t-1} - SNR_t) / 2 * 1e-14 < 1e-10 bits;
    the rest is normal_kl's rounding of -1 + lv (see test_kl_terms_are_never_negative),
    at most half an ulp of 1 + |lv| <= 11, i.e. 3.4e-7 bits.
    """
    rows = np.nonzero(np.sqrt(1 - ABAR) <= 0.1)[0]
    rows = rows[rows >= 1]
    assert len(rows) > 20
    np.testing.assert_array_less(f64(nll_runs.terms)[..., rows], 1e-6)


def test_kl_terms_carry_the_entropy_of_the_data(nll_runs):
    """sum_t KL_t ~ I(x_0; x_1) = log2(K) / D bits/dim in expectation, from above (module docstring)."""
    kl_sum = f64(nll_runs.terms)[..., 1:].sum(-1).ravel()  # 32 estimates, 8 keys x 4 images
    mean, se = kl_sum.mean(), kl_sum.std(ddof=1) / math.sqrt(kl_sum.size)
    # I(x_0; x_T) <= SNR_T / 2 E||x_0||^2 nats is negligible (SNR_T = 4e-5).
    assert mean > ENTROPY_BPD - 4 * se - 1e-4
    # The information arrives in the middle of the chain. In the first 100 rows (sigma <= 0.33)
    # a wrong image is >= ~10 nats less likely, so x0_hat ~ x_0; the last 100 rows have
    # sum of (SNR_{t-1} - SNR_t) = SNR_899 = 3e-4, so the convex-hull bound keeps them tiny.
    # Together they carry under 1% of the information.
    terms = f64(nll_runs.terms)
    edges = terms[..., 1:101].sum(-1) + terms[..., -100:].sum(-1)
    assert np.all(edges < 0.01 * ENTROPY_BPD)


def test_bound_is_not_below_the_data_entropy(nll_runs):
    assert f64(nll_runs.total).mean() >= ENTROPY_BPD


def test_decoder_term_is_the_closed_form(nll_runs):
    # The optimal model's x0_hat at t = 0 is x_0 (to ~2e-7, against a scale of 7e-3:
    # a relative change of log P below 1e-4; the interior bin is symmetric, so first order vanishes).
    scale = math.sqrt(post_var(1))  # exp(0.5 posterior_log_variance_clipped[0]) = sqrt(tilde-beta_1)
    ref = decoder_bits_exact_mean(scale)
    np.testing.assert_allclose(f64(nll_runs.terms)[..., 0], np.broadcast_to(ref, (8, K)), rtol=2e-4)


def test_a_worse_model_gets_a_larger_bound(schedule, nll_runs):
    best = optimal_eps_fn(ABAR)
    worse = jax.jit(
        lambda key: dj.nll_bpd(lambda x, t: 0.9 * best(x, t), schedule, jnp.asarray(IMAGES, jnp.float32), key)
    )(jax.random.PRNGKey(0))
    assert f64(worse.total).mean() > f64(nll_runs.total).mean() + 0.1


def test_respaced_schedule_has_fewer_terms_and_calls_the_model_with_original_timesteps(schedule):
    kept = dj.evenly_spaced_timesteps(T, 100)
    spaced = dj.respace(schedule, kept)
    x0 = jnp.asarray(IMAGES, jnp.float32)
    nll = jax.jit(lambda key: dj.nll_bpd(optimal_eps_fn(ABAR), spaced, x0, key))(jax.random.PRNGKey(1))
    terms = f64(nll.terms)
    assert terms.shape == (K, 100)
    assert np.all(terms[:, 1:] >= -EPS32 * (1 + abs(math.log(post_var(1)))) / LOG2)  # as above
    np.testing.assert_allclose(f64(nll.total), f64(nll.prior) + terms.sum(1), rtol=100 * EPS32)
    # The respaced decoder scale: tilde-beta'_1 = beta'_1 (1 - abar_{k_0}) / (1 - abar_{k_1}).
    abar = ABAR[kept]
    betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    scale = math.sqrt(post_var(1, abar, betas))
    np.testing.assert_allclose(terms[:, 0], decoder_bits_exact_mean(scale), rtol=2e-4)

    # A model that knows x_0 predicts eps exactly only if it sees the original timestep:
    # every KL term is then ~0 (a wrong timestep would miss by ~sqrt(abar) differences).
    def knows_x0(x_t, ts):
        abar_t = jnp.asarray(ABAR, jnp.float32)[ts].reshape(-1, 1, 1, 1)
        return (x_t - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1 - abar_t)

    oracle = jax.jit(lambda key: dj.nll_bpd(knows_x0, spaced, x0, key))(jax.random.PRNGKey(2))
    np.testing.assert_array_less(f64(oracle.terms)[:, 1:], 1e-6)
