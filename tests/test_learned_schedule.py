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
