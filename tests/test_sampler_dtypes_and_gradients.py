"""The samplers with model outputs of other dtypes, float64 states, and gradients through a schedule.

A user's model may compute in bfloat16 or float64; every sampler keeps its state's dtype
(float32, or float64 for a float64 x_T). Gradients of a sample with respect to a traced
schedule (a learned one) must be finite at the last step, where 1 - abar_{t-1} = 0 and the
log-SNR step h = 0; they are checked against central differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj

SHAPE = (2, 4, 4, 1)


@pytest.fixture(scope="module")
def schedule():
    return dj.make_schedule("cosine", 20)


def _x0_model(dtype):
    # An x0-predicting model: a smooth map of x_t, returned in `dtype`.
    return lambda x, t: (0.8 * jnp.tanh(x)).astype(dtype)


@pytest.mark.parametrize("sampler", dj.SAMPLERS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_model_outputs(schedule, sampler, prediction, dtype):
    key = jax.random.PRNGKey(0)
    kwargs = {"sampler": sampler, "num_steps": 6, "prediction": prediction, "clip_denoised": False}
    low = dj.sample(_x0_model(dtype), schedule, SHAPE, key, **kwargs)
    # The same model with its output rounded to `dtype` but handed over in float32.
    rounded = dj.sample(lambda x, t: _x0_model(dtype)(x, t).astype(jnp.float32), schedule, SHAPE, key, **kwargs)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, rounded, rtol=1e-6, atol=1e-6)


def test_float64_state_and_outputs(schedule):
    jax.config.update("jax_enable_x64", True)
    try:
        key = jax.random.PRNGKey(0)
        x_T = jax.random.normal(key, SHAPE, jnp.float64)
        # A model whose output is float64 (a NumPy constant promotes it), with a float32 state.
        model = lambda x, t: jnp.tanh(x) / np.sqrt(2.0)
        for sampler in dj.SAMPLERS:
            out32 = dj.sample(model, schedule, SHAPE, key, sampler=sampler, num_steps=5, x_T=x_T.astype(jnp.float32))
            assert out32.dtype == jnp.float32
            # A float64 x_T keeps the state in float64: the same sample to float32 precision.
            out64 = dj.sample(model, schedule, SHAPE, key, sampler=sampler, num_steps=5, x_T=x_T)
            assert out64.dtype == jnp.float64
            np.testing.assert_allclose(out64, out32, rtol=1e-4, atol=1e-4)
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("dpm_solver++", 0.0)])
def test_gradient_through_a_traced_schedule_matches_finite_differences(sampler, eta):
    log_snr = jnp.linspace(6.0, -6.0, 8)
    model = lambda x, t: 0.2 * jnp.tanh(x)
    key = jax.random.PRNGKey(0)

    def total(shift):
        schedule = dj.schedule_from_log_snr(log_snr + shift)  # traced: a learned schedule's path
        return dj.sample(model, schedule, SHAPE, key, sampler=sampler, eta=eta, clip_denoised=False).sum()

    grad = float(jax.grad(total)(0.0))
    f = jax.jit(total)
    h = 1e-2
    central = float((f(h) - f(-h)) / (2 * h))
    assert np.isfinite(grad)
    assert abs(central) > 0.5  # the sample does depend on the schedule
    np.testing.assert_allclose(grad, central, rtol=2e-3)
