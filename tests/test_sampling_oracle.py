"""The oracle test of the whole reverse process.

For data from a Gaussian mixture sum_k w_k N(m_k, s_k^2 I), q(x_t) is again a
mixture, sum_k w_k N(a_t m_k, (a_t^2 s_k^2 + 1 - a_t^2) I) with a_t = sqrt(alphabar_t),
and the optimal eps-predictor E[eps | x_t] = -sqrt(1 - alphabar_t) grad log q(x_t)
is a closed-form function of x_t and t. Given it, every sampler must give back
the mixture: its weights, component means and spreads.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj

WEIGHTS = np.array([0.2, 0.3, 0.5])
MEANS = np.array([[-0.6, -0.3], [0.0, 0.5], [0.55, -0.35]])
STDS = np.array([0.05, 0.1, 0.08])
NUM_SAMPLES = 4000


def optimal_eps_fn(alphas_cumprod):
    """E[eps | x_t] for the mixture, written from the formula above, not from the library."""
    weights, means, stds = jnp.asarray(WEIGHTS), jnp.asarray(MEANS), jnp.asarray(STDS)
    dim = means.shape[1]

    def model_fn(x, t):
        abar = alphas_cumprod[t][:, None]  # [B, 1], indexed by the ORIGINAL timestep
        a, sigma2 = jnp.sqrt(abar), 1.0 - abar
        var = a**2 * stds[None, :] ** 2 + sigma2  # [B, K]
        diff = x[:, None, :] - a[:, :, None] * means[None]  # [B, K, D]
        logits = jnp.log(weights)[None] - 0.5 * dim * jnp.log(var) - 0.5 * jnp.sum(diff**2, -1) / var
        resp = jax.nn.softmax(logits, axis=-1)
        score = -jnp.sum(resp[..., None] * diff / var[..., None], axis=1)
        return -jnp.sqrt(sigma2) * score

    return model_fn


def mixture_statistics(x):
    """Weights, means and per-coordinate spreads of samples assigned to their nearest component."""
    assign = np.argmin(((x[:, None, :] - MEANS[None]) ** 2).sum(-1), axis=1)
    weights = np.array([(assign == k).mean() for k in range(len(WEIGHTS))])
    means = np.stack([x[assign == k].mean(0) for k in range(len(WEIGHTS))])
    stds = np.array([x[assign == k].std(0).mean() for k in range(len(WEIGHTS))])
    return weights, means, stds


def check_mixture(x, *, std_rtol):
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x))
    weights, means, stds = mixture_statistics(x)
    # Sampling error of a weight at n = 4000 is <= 0.008; allow about 4 sigma.
    np.testing.assert_allclose(weights, WEIGHTS, atol=0.03)
    # Means within half the narrowest spread (their sampling error is ~0.002).
    np.testing.assert_allclose(means, MEANS, atol=0.025)
    np.testing.assert_allclose(stds, STDS, rtol=std_rtol)


def test_mixture_statistics_accept_true_samples_and_reject_wrong_ones():
    """The checker itself: it passes exact draws and fails over-dispersed ones."""
    rng = np.random.default_rng(0)
    k = rng.choice(3, NUM_SAMPLES, p=WEIGHTS)
    exact = MEANS[k] + STDS[k, None] * rng.standard_normal((NUM_SAMPLES, 2))
    check_mixture(exact, std_rtol=0.1)
    too_wide = MEANS[k] + 1.3 * STDS[k, None] * rng.standard_normal((NUM_SAMPLES, 2))
    with pytest.raises(AssertionError):
        check_mixture(too_wide, std_rtol=0.1)


# (sampler, num_steps, spacing, variance). Few-step DDIM uses log-SNR spacing:
# on time-uniform spacing its first-order error under-disperses this sharp
# mixture by 10-20% at 50 steps (it converges: see the 1000-step case).
CASES = [
    ("ddpm", None, None, "fixed_small"),
    ("ddpm", None, None, "fixed_large"),
    ("ddim", 1000, "time", "fixed_small"),
    ("ddim", 50, "log_snr", "fixed_small"),
    ("ddim", 100, "log_snr", "fixed_small"),
    ("dpm_solver++", 20, None, "fixed_small"),
]


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,num_steps,spacing,variance", CASES)
def test_samplers_reproduce_gaussian_mixture(schedule_name, sampler, num_steps, spacing, variance):
    schedule = dj.make_schedule(schedule_name, 1000)
    model_fn = optimal_eps_fn(schedule.alphas_cumprod)
    run = jax.jit(
        lambda key: dj.sample(
            model_fn,
            schedule,
            (NUM_SAMPLES, 2),
            key,
            sampler=sampler,
            num_steps=num_steps,
            spacing=spacing,
            variance=variance,
            clip_denoised=False,
        )
    )
    x = run(jax.random.PRNGKey(1))
    check_mixture(x, std_rtol=0.1)


def test_respaced_schedule_passed_directly_reproduces_mixture():
    """A respaced schedule given to sample(): the model must still see original timesteps."""
    schedule = dj.make_schedule("linear", 1000)
    spaced = dj.respace(schedule, dj.log_snr_spaced_timesteps(schedule, 250))
    model_fn = optimal_eps_fn(schedule.alphas_cumprod)
    x = dj.sample(
        model_fn, spaced, (NUM_SAMPLES, 2), jax.random.PRNGKey(2), sampler="ddpm", variance="fixed_large",
        clip_denoised=False,
    )
    check_mixture(x, std_rtol=0.1)


def test_ddim_eta_one_is_ancestral_sampling_with_posterior_variance():
    """Song et al. 2021 sec. 4.1: eta = 1 gives sigma_t^2 = tilde-beta_t, i.e. DDPM with fixed_small."""
    schedule = dj.respace(dj.make_schedule("cosine", 1000), dj.evenly_spaced_timesteps(1000, 100))
    model_fn = optimal_eps_fn(dj.make_schedule("cosine", 1000).alphas_cumprod)
    kw = dict(clip_denoised=False)
    key = jax.random.PRNGKey(3)
    ddim = dj.sample(model_fn, schedule, (512, 2), key, sampler="ddim", eta=1.0, **kw)
    ddpm = dj.sample(model_fn, schedule, (512, 2), key, sampler="ddpm", variance="fixed_small", **kw)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-4)


def test_fixed_variances_bracket_the_truth_with_few_steps():
    """Ho et al. 2020 sec. 3.2: tilde-beta_t and beta_t are the lower and upper extremes.

    With 100 ancestral steps the mixture spreads come out below the truth
    with fixed_small and above it with fixed_large.
    """
    schedule = dj.make_schedule("linear", 1000)
    spaced = dj.respace(schedule, dj.evenly_spaced_timesteps(1000, 100))
    model_fn = optimal_eps_fn(schedule.alphas_cumprod)
    spreads = {}
    for variance in ("fixed_small", "fixed_large"):
        x = dj.sample(
            model_fn, spaced, (NUM_SAMPLES, 2), jax.random.PRNGKey(4), sampler="ddpm", variance=variance,
            clip_denoised=False,
        )
        spreads[variance] = mixture_statistics(np.asarray(x, np.float64))[2]
    assert np.all(spreads["fixed_small"] < 0.95 * STDS)
    assert np.all(spreads["fixed_large"] > 1.05 * STDS)


def test_x0_and_v_predictors_reproduce_mixture():
    """The same oracle expressed as x0 and v predictions, converted by hand."""
    schedule = dj.make_schedule("cosine", 1000)
    eps_fn = optimal_eps_fn(schedule.alphas_cumprod)

    def x0_fn(x, t):
        abar = schedule.alphas_cumprod[t][:, None]
        return (x - jnp.sqrt(1 - abar) * eps_fn(x, t)) / jnp.sqrt(abar)

    def v_fn(x, t):
        abar = schedule.alphas_cumprod[t][:, None]
        eps = eps_fn(x, t)
        x0 = (x - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)
        return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0

    for prediction, fn in [("x0", x0_fn), ("v", v_fn)]:
        x = dj.sample(
            fn,
            schedule,
            (NUM_SAMPLES, 2),
            jax.random.PRNGKey(4),
            sampler="dpm_solver++",
            num_steps=20,
            prediction=prediction,
            clip_denoised=False,
        )
        check_mixture(x, std_rtol=0.1)


def test_wrong_predictor_fails_the_oracle_check():
    """A test that can fail: an eps-predictor scaled by 0.8 must not reproduce the mixture."""
    schedule = dj.make_schedule("linear", 1000)
    good = optimal_eps_fn(schedule.alphas_cumprod)
    x = dj.sample(
        lambda x, t: 0.8 * good(x, t), schedule, (NUM_SAMPLES, 2), jax.random.PRNGKey(5), sampler="ddim",
        num_steps=50, clip_denoised=False,
    )
    with pytest.raises(AssertionError):
        check_mixture(x, std_rtol=0.1)


# ----------------------------------------------------------------------------- DDIM with 0 < eta < 1


def test_ddim_eta_half_steps_match_song_et_al_eq_12_and_16():
    """Every DDIM step at eta = 0.5 against Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16, in float64.

    For Gaussian data x_0 ~ N(0, v I) the Bayes-optimal eps-predictor is linear,
    E[eps | x_t] = sqrt(1 - abar_t) x_t / m_t with m_t = abar_t v + 1 - abar_t, and so is
    x0_hat = sqrt(abar_t) v x_t / m_t. A DDIM step from row t to row s < t is then
    x_s = A_t x_t + sigma_t z with
      A_t = sqrt(abar_s) sqrt(abar_t) v / m_t + sqrt(1 - abar_s - sigma_t^2) sqrt(1 - abar_t) / m_t,
      sigma_t = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s),
    and the last step returns x0_hat. Over many independent coordinates the
    regression slope of x_s on x_t must be A_t and the residual variance sigma_t^2.
    """
    v, eta, num_steps = 0.25, 0.5, 10
    base = dj.make_schedule("linear", 1000)
    abar = np.asarray(base.alphas_cumprod, np.float64)
    tab = base.alphas_cumprod

    def model_fn(x, t):
        return jnp.sqrt(1.0 - tab[t])[:, None] * x / (tab[t][:, None] * v + 1.0 - tab[t][:, None])

    _, trajectory = dj.sample(model_fn, base, (10000, 2), jax.random.PRNGKey(6), sampler="ddim", eta=eta,
                              num_steps=num_steps, spacing="time", clip_denoised=False, return_trajectory=True)
    trajectory = np.asarray(trajectory, np.float64).reshape(num_steps + 1, -1)
    rows = np.round(np.linspace(0, 999, num_steps)).astype(int)  # the kept rows, t_0 = 0 ... t_9 = 999
    n = trajectory.shape[1]
    for i in range(num_steps - 1, -1, -1):
        x_t, x_s = trajectory[num_steps - 1 - i], trajectory[num_steps - i]
        a_t = abar[rows[i]]
        m_t = a_t * v + 1.0 - a_t
        if i == 0:  # the last step: x0_hat, no noise
            np.testing.assert_allclose(x_s, np.sqrt(a_t) * v / m_t * x_t, rtol=1e-4, atol=1e-5)
            continue
        a_s = abar[rows[i - 1]]
        sigma = eta * np.sqrt((1.0 - a_s) / (1.0 - a_t)) * np.sqrt(1.0 - a_t / a_s)
        slope = np.sqrt(a_s) * np.sqrt(a_t) * v / m_t + np.sqrt(1.0 - a_s - sigma**2) * np.sqrt(1.0 - a_t) / m_t
        assert sigma > 1e-3  # 5e-3 at the step into row 0 (1 - abar_0 = 1e-4), 0.47 at the first
        # Least-squares slope (standard error sigma / |x_t|) and residual variance
        # (relative standard error sqrt(2 / n) = 1%), each within 5 standard errors.
        slope_hat = np.dot(x_s, x_t) / np.dot(x_t, x_t)
        assert abs(slope_hat - slope) < 5 * sigma / np.linalg.norm(x_t) + 1e-5, (i, slope_hat, slope)
        residual_var = np.mean((x_s - slope * x_t) ** 2)
        assert abs(residual_var / sigma**2 - 1.0) < 5 * np.sqrt(2.0 / n), (i, residual_var, sigma**2)


# --- Classifier-free guidance (Ho & Salimans 2022 eq. 6) -------------------------------------


def _label_model(calls):
    """A conditional model whose output depends on x, t and y in a known way; records batch sizes."""
    def model(x, t, y):
        calls.append(x.shape[0])
        scale = (y.astype(jnp.float32) + 1.0)[:, None, None, None]
        return jnp.concatenate([x * scale + t[:, None, None, None] * 0.01, jnp.tanh(x) - scale], axis=-1)
    return model


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("w", [0.3, 2.0])
def test_guidance_is_eq_6_on_the_prediction_channels(variance, w):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1))
    t = jnp.array([5, 0, 9], jnp.int32)
    labels = jnp.array([0, 4, 2], jnp.int32)
    calls = []
    model = _label_model(calls)
    channels = 2 if variance == "learned_range" else 1

    def cond(x, t, y):
        return model(x, t, y)[..., :channels]

    guided = dj.classifier_free_guidance(cond, labels, guidance_scale=w, null_label=7, variance=variance)
    got = np.asarray(guided(x, t))
    xs, ts = np.asarray(x), np.asarray(t, np.float64)[:, None, None, None]
    pred_c = xs * (np.asarray(labels) + 1.0)[:, None, None, None] + ts * 0.01
    pred_u = xs * 8.0 + ts * 0.01
    np.testing.assert_allclose(got[..., :1], (1 + w) * pred_c - w * pred_u, rtol=1e-5, atol=1e-5)
    if variance == "learned_range":  # the conditional branch's variance channels
        np.testing.assert_allclose(got[..., 1:], np.tanh(xs) - (np.asarray(labels) + 1.0)[:, None, None, None],
                                   rtol=1e-5, atol=1e-6)
    assert calls == [6]  # both halves as one batch of 2B


def test_guidance_scale_zero_runs_the_conditional_model_alone():
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 2, 1))
    t = jnp.array([1, 2, 3], jnp.int32)
    labels = jnp.array([0, 1, 2], jnp.int32)
    calls = []
    model = _label_model(calls)
    cond = lambda x, t, y: model(x, t, y)[..., :1]  # noqa: E731
    got = dj.classifier_free_guidance(cond, labels, guidance_scale=0.0, null_label=3)(x, t)
    assert calls == [3]  # not a doubled batch
    np.testing.assert_array_equal(np.asarray(got), np.asarray(cond(x, t, labels)))
    # A traced w of 0 cannot be told apart while tracing: both halves run, with the same result.
    calls.clear()
    traced = jax.jit(lambda w: dj.classifier_free_guidance(cond, labels, guidance_scale=w, null_label=3)(x, t))(0.0)
    assert calls == [6]
    np.testing.assert_allclose(np.asarray(traced), np.asarray(got), rtol=1e-6)
