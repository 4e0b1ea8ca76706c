"""The learned log-SNR schedule (Kingma et al. 2021): monotone by construction,
a valid DiffusionSchedule, and trainable through the variational bound.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj

T = 100
EPS32 = float(np.finfo(np.float32).eps)


def f64(x):
    return np.asarray(x, np.float64)


@pytest.fixture(scope="module")
def module():
    return dj.LearnedSchedule(T, hidden_features=16)


@pytest.fixture(scope="module")
def params(module):
    return module.init(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def build_jit(module):
    return jax.jit(module.apply)


def build(module, params):
    return module.apply(params)


def log_snr_at(module, params, t):
    return module.apply(params, jnp.asarray(t, jnp.float32), method=module.log_snr)


@pytest.fixture(scope="module")
def log_snr_jit(module):
    return jax.jit(lambda p, t: log_snr_at(module, p, t))


def assert_valid_schedule(s, num_timesteps=T):
    betas, abar = f64(s.betas), f64(s.alphas_cumprod)
    assert s.num_timesteps == num_timesteps
    assert np.all(np.isfinite(betas)) and np.all((betas > 0) & (betas < 1))
    assert np.all((abar > 0) & (abar < 1)) and np.all(np.diff(abar) < 0)
    np.testing.assert_array_equal(np.asarray(s.timesteps), np.arange(num_timesteps))


def test_init_spans_the_configured_log_snr_range(module, params):
    lam = f64(log_snr_at(module, params, [0.0, 0.5, 1.0]))
    # lambda(0) = lambda_max and lambda(1) = lambda_max - softplus(inv_softplus(20)) by construction.
    np.testing.assert_allclose(lam[[0, 2]], [10.0, -10.0], atol=1e-4)
    assert lam[0] > lam[1] > lam[2]


def test_init_schedule_is_valid_and_strictly_decreasing_in_log_snr(module, params, build_jit):
    s = build_jit(params)
    assert_valid_schedule(s)
    lam = np.log(f64(s.alphas_cumprod)) - np.log(f64(s.one_minus_alphas_cumprod))
    assert np.all(np.diff(lam) < 0)
    # Row i sits at t = (i + 1) / T; the tables hold sigmoid(lambda) (Kingma et al. 2021 sec. 3).
    lam_direct = f64(log_snr_at(module, params, np.arange(1, T + 1) / T))
    np.testing.assert_allclose(lam, lam_direct, atol=1e-4)
    np.testing.assert_allclose(f64(s.alphas_cumprod), 1 / (1 + np.exp(-lam_direct)), rtol=1e-5)


def perturbed(params, key, scale):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


@pytest.mark.parametrize("seed", range(4))
def test_log_snr_stays_strictly_decreasing_under_large_perturbations(params, seed, build_jit, log_snr_jit):
    """Monotone by construction: |W| in every layer, whatever the parameter values."""
    p = perturbed(params, jax.random.PRNGKey(seed), scale=5.0)
    t = np.linspace(0, 1, 2001)
    lam = f64(log_snr_jit(p, jnp.asarray(t, jnp.float32)))
    assert np.all(np.isfinite(lam))
    assert np.all(np.diff(lam) < 0)
    s = build_jit(p)
    betas = f64(s.betas)
    assert np.all(np.isfinite(betas)) and np.all((betas > 0) & (betas <= 1))


def test_log_snr_is_strictly_decreasing_even_with_zero_linear_weight(params, log_snr_jit):
    """With l1's weight at 0 the 1e-3 t floor keeps lambda strictly decreasing."""
    p = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "l1" in jax.tree_util.keystr(path) else x, params
    )
    lam = f64(log_snr_jit(p, jnp.linspace(0, 1, 2001)))
    assert np.all(np.diff(lam) < 0)


def vlb_loss(module, params, x0, t, noise):
    schedule = build(module, params)

    def model_fn(x_t, ts):  # a fixed, imperfect eps-model: the bound then depends on the schedule
        return 0.5 * x_t

    return jnp.mean(dj.training_losses(model_fn, schedule, x0, t, noise, loss="vlb").loss)


def test_vlb_gradient_reaches_and_improves_the_schedule(module, params, build_jit):
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(2 * rng.integers(0, 256, (16, 4, 4, 1)) / 255 - 1, jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.asarray(rng.integers(1, T, 16), jnp.int32)

    loss_and_grad = jax.jit(jax.value_and_grad(lambda p: vlb_loss(module, p, x0, t, noise)))
    loss, grads = loss_and_grad(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(f64(g))) for g in leaves)
    sq_norm = sum(float(jnp.sum(g**2)) for g in leaves)
    assert sq_norm > 0
    assert float(jnp.abs(grads["params"]["log_snr_max"])) > 0

    # A small step along -grad lowers the loss (first order: by lr * |grad|^2) and moves the schedule.
    lr = 1e-3 / math.sqrt(sq_norm)
    stepped = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    new_loss, _ = loss_and_grad(stepped)
    assert float(new_loss) < float(loss)
    before = f64(build_jit(params).alphas_cumprod)
    after = f64(build_jit(stepped).alphas_cumprod)
    assert np.max(np.abs(after - before)) > 0


def test_jitted_and_eager_schedules_agree(module, params, build_jit):
    """Eagerly the tables are built in float64 NumPy, under jit in float32 JAX."""
    eager = build(module, params)
    jitted = build_jit(params)
    assert_valid_schedule(eager)
    for name in ("betas", "alphas_cumprod", "one_minus_alphas_cumprod"):
        # lambda in float32 to ~1e-6 absolute: ~1e-6 relative in alphabar and 1 - alphabar,
        # ~1e-6 / beta relative in beta near t = 0 (beta ~ 1e-2 here).
        np.testing.assert_allclose(f64(getattr(jitted, name)), f64(getattr(eager, name)), rtol=1e-4)


def test_training_the_schedule_on_the_vlb_loss_keeps_x_T_near_the_prior(module, params):
    """The prior term L_T is part of the loss a learned schedule trains on.

    Gaussian data x0 ~ N(0, v I) and, held fixed, the Bayes-optimal eps-model of
    the current schedule, E[eps | x_t] = sqrt(1 - abar) x_t / (abar v + 1 - abar):
    what is left to train is the schedule. Without L_T the rest of the bound
    falls as lambda(t = 1) rises (fewer, easier steps), and Adam drives it past
    +6 within 350 steps (measured when the loss lacked L_T: lambda(1) = 6.9 at
    step 350 and 14.4 at step 700, x_T nearly noise-free); with L_T the bound has
    a minimum where q(x_T | x_0) is still close to N(0, I) (measured: lambda(1)
    near -1 from step 350 on).
    """
    optax = pytest.importorskip("optax")
    v, dims, draws = 0.25, 4, 32
    rows = jnp.repeat(jnp.arange(T, dtype=jnp.int32), draws)  # every row, `draws` times

    def loss(p, key):
        s = module.apply(p)
        k_x, k_noise = jax.random.split(key)
        x0 = math.sqrt(v) * jax.random.normal(k_x, (T * draws, dims))
        noise = jax.random.normal(k_noise, x0.shape)
        abar = jax.lax.stop_gradient(s.alphas_cumprod)[rows][:, None]

        def model_fn(x_t, ts):
            return jnp.sqrt(1 - abar) * x_t / (abar * v + 1 - abar)

        return jnp.mean(dj.training_losses(model_fn, s, x0, rows, noise, loss="vlb").loss)

    tx = optax.adam(3e-2)

    @jax.jit
    def step(p, opt_state, key):
        grads = jax.grad(loss)(p, key)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(p, updates), opt_state

    p, opt_state = params, tx.init(params)
    for i in range(350):
        p, opt_state = step(p, opt_state, jax.random.PRNGKey(i))
    lam_end = float(log_snr_at(module, p, [1.0])[0])
    assert np.isfinite(lam_end)
    assert lam_end < 2.0, f"lambda(t=1) = {lam_end}: x_T has drifted far from N(0, I)"
    # And it did move: the initial -10 is far below the bound's minimum here.
    assert lam_end > -8.0
