"""Every public function rejects bad input with a clear error that names what is wrong."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj

T = 50


@pytest.fixture(scope="module")
def schedule():
    return dj.make_schedule("linear", T)


B, SHAPE = 3, (3, 4, 4, 2)
X = jnp.zeros(SHAPE, jnp.float32)
TS = jnp.array([0, 10, 49], jnp.int32)


def zeros_model(x, t):
    return jnp.zeros_like(x)


# --- Schedules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (("quadratic", 10), {}, ValueError, r"unknown schedule 'quadratic'.*linear"),
        (("linear", 0), {}, ValueError, r"num_timesteps must be an integer >= 1, got 0"),
        (("linear", -5), {}, ValueError, r"num_timesteps must be an integer >= 1"),
        (("linear", 100.0), {}, ValueError, r"num_timesteps must be an integer >= 1, got 100\.0"),
        (("linear", True), {}, ValueError, r"num_timesteps must be an integer"),
        (("linear", "100"), {}, ValueError, r"num_timesteps must be an integer"),
        (("cosine", 10), {"beta_start": 0.1}, TypeError, r"schedule 'cosine'.*beta_start"),
        (("linear", 10), {"s": 0.008}, TypeError, r"schedule 'linear'.*'s'"),
        (("linear", 10), {}, ValueError, r"linear schedule betas must lie in \(0, 1\).*1000/T"),
        (("sigmoid", 10), {"start": 3.0, "end": -3.0}, ValueError, r"sigmoid schedule needs end > start"),
        (("sigmoid", 10), {"tau": 0.0}, ValueError, r"sigmoid schedule needs tau > 0"),
        (("log_snr_linear", 10), {"log_snr_max": -1.0, "log_snr_min": 1.0}, ValueError, r"log_snr_max > log_snr_min"),
    ],
)
def test_make_schedule_rejects(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        dj.make_schedule(*args, **kwargs)


@pytest.mark.parametrize(
    "betas,match",
    [
        (np.zeros((2, 3)) + 0.1, r"betas must be a non-empty \[T\] vector, got shape \(2, 3\)"),
        (np.zeros((0,)), r"betas must be a non-empty \[T\] vector"),
        (np.array([0.1, 0.0, 0.2]), r"betas must lie in \(0, 1\)"),
        (np.array([0.1, 1.0]), r"betas must lie in \(0, 1\)"),
        (np.array([-0.1, 0.5]), r"betas must lie in \(0, 1\)"),
    ],
)
def test_schedule_from_betas_rejects(betas, match):
    with pytest.raises(ValueError, match=match):
        dj.schedule_from_betas(betas)


@pytest.mark.parametrize(
    "log_snr,match",
    [
        (np.array([1.0, 2.0, 0.0]), r"log_snr must be strictly decreasing"),
        (np.array([1.0, 1.0]), r"log_snr must be strictly decreasing"),
        (np.zeros((2, 2)), r"log_snr must be a non-empty \[T\] vector"),
        (np.zeros((0,)), r"log_snr must be a non-empty \[T\] vector"),
        (np.array([np.inf, 1.0, 0.0]), r"log_snr must be finite.*got inf at t = 0$"),  # alphabar_0 = 1: 0/0
        (np.array([1.0, 0.0, -np.inf]), r"log_snr must be finite.*got -inf at t = 2$"),
    ],
)
def test_schedule_from_log_snr_rejects(log_snr, match):
    with pytest.raises(ValueError, match=match):
        dj.schedule_from_log_snr(log_snr)


@pytest.mark.parametrize(
    "timesteps,match",
    [
        ([0.5, 1.7, 3.0], r"timesteps must be integers \(original timestep indices\), got dtype float64"),
        ([0, 1, 2, 3, 4], r"timesteps must have shape \[T\] = \(3,\), got \(5,\)"),
        ([[0, 1, 2]], r"timesteps must have shape \[T\] = \(3,\), got \(1, 3\)"),
        ([-1, 4, 9], r"timesteps must be >= 0 and strictly increasing, got \[-1, 4, 9\]"),
        ([0, 9, 4], r"timesteps must be >= 0 and strictly increasing"),
    ],
)
@pytest.mark.parametrize("build", ["betas", "alphas_cumprod", "log_snr"])
def test_schedule_constructors_reject_bad_timesteps(build, timesteps, match):
    betas = np.array([0.1, 0.2, 0.3])
    abar = np.cumprod(1.0 - betas)
    values = {"betas": betas, "alphas_cumprod": abar, "log_snr": np.log(abar / (1.0 - abar))}[build]
    make = {"betas": dj.schedule_from_betas, "alphas_cumprod": dj.schedule_from_alphas_cumprod,
            "log_snr": dj.schedule_from_log_snr}[build]
    with pytest.raises(ValueError, match=match):
        make(values, timesteps=timesteps)
    # Valid original indices (a respacing's) are kept as given.
    np.testing.assert_array_equal(make(values, timesteps=[0, 4, 9]).timesteps, [0, 4, 9])


def test_schedule_from_alphas_cumprod_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"alphas_cumprod must be a non-empty \[T\] vector"):
        dj.schedule_from_alphas_cumprod(np.full((2, 2), 0.5))


@pytest.mark.parametrize("abar", [[0.5, 0.9], [0.9, 0.0], [1.5, 0.5],
                                  [1.0, 0.9, 0.5]])  # alphabar_0 = 1: beta_0 = 0, coef1 = 0/0 at t = 0
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_schedule_from_alphas_cumprod_rejects_invalid_values(abar):
    with pytest.raises(ValueError, match="alphas_cumprod"):
        dj.schedule_from_alphas_cumprod(np.array(abar))


def test_alphas_cumprod_within_an_ulp_of_one_is_accepted_with_its_exact_complement():
    """alphabar rounds to 1.0 in float64 but the given 1 - alphabar is positive: a valid schedule."""
    schedule = dj.schedule_from_alphas_cumprod(np.array([1.0, 0.9, 0.5]),
                                               one_minus_alphas_cumprod=np.array([1e-20, 0.1, 0.5]))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(schedule))
    # beta_0 = 1 - alphabar_0, so the t = 0 posterior mean is x_0 itself (coef1 = 1, coef2 = 0).
    np.testing.assert_allclose(np.asarray(schedule.betas, np.float64), [1e-20, 0.1, 1 - 0.5 / 0.9], rtol=1e-6)
    assert float(schedule.posterior_mean_coef1[0]) == 1.0 and float(schedule.posterior_mean_coef2[0]) == 0.0


def test_training_losses_refuses_min_snr_gamma_with_the_bound_alone(schedule):
    with pytest.raises(ValueError, match=r"min_snr_gamma weights the simple loss, which loss='vlb' does not have"):
        dj.training_losses(zeros_model, schedule, X, TS, X, loss="vlb", min_snr_gamma=5.0)


@pytest.mark.parametrize(
    "timesteps,match",
    [
        ([], r"respace needs a non-empty 1-D list of timesteps"),
        ([[0, 1], [2, 3]], r"respace needs a non-empty 1-D list"),
        ([0, 5, 5, 9], r"respace timesteps must be strictly increasing"),
        ([0, 9, 5], r"respace timesteps must be strictly increasing"),
        ([-1, 5], r"respace timesteps must lie in \[0, 49\]"),
        ([0, 50], r"respace timesteps must lie in \[0, 49\], got 0\.\.50"),
        ([0.0, 5.0], r"respace timesteps must be integers"),
    ],
)
def test_respace_rejects(schedule, timesteps, match):
    with pytest.raises(ValueError, match=match):
        dj.respace(schedule, timesteps)


@pytest.mark.parametrize("num_steps", [0, -1, T + 1])
def test_spacings_reject_num_steps_out_of_range(schedule, num_steps):
    with pytest.raises(ValueError, match=rf"num_steps must be in \[1, {T}\], got {num_steps}"):
        dj.evenly_spaced_timesteps(T, num_steps)
    with pytest.raises(ValueError, match=rf"num_steps must be in \[1, {T}\], got {num_steps}"):
        dj.log_snr_spaced_timesteps(schedule, num_steps)


def test_log_snr_spacing_needs_a_concrete_schedule(schedule):
    with pytest.raises(ValueError, match=r"log-SNR spacing needs a concrete schedule"):
        jax.jit(lambda s: dj.log_snr_spaced_timesteps(s, 5))(schedule)


# --- Forward process, posterior, reverse process ----------------------------------------


@pytest.mark.parametrize(
    "x0,t,noise,error,match",
    [
        (
            jnp.zeros((8,)),
            jnp.array([0]),
            jnp.zeros((8,)),
            ValueError,
            r"x0 must have shape \[B, \.\.\.\] with rank >= 2, got shape \(8,\)",
        ),
        (X, TS, jnp.zeros((3, 4, 4, 1)), ValueError, r"shapes must match.*x0.*noise"),
        (X.astype(jnp.int32), TS, X, TypeError, r"x0 must be a floating-point array, got dtype int32"),
        (np.zeros(SHAPE).tolist(), TS, X, TypeError, r"x0 must be an array, got list"),
        (X, jnp.array([0, 10, 50]), X, ValueError, r"t must lie in \[0, 49\], got values in \[0, 50\]"),
        (X, jnp.array([-1, 0, 3]), X, ValueError, r"t must lie in \[0, 49\]"),
        (X, jnp.array([0, 1]), X, ValueError, r"t must have shape \[B\] = \(3,\), got \(2,\)"),
        (X, jnp.zeros((3, 1), jnp.int32), X, ValueError, r"t must have shape \[B\] = \(3,\), got \(3, 1\)"),
        (X, jnp.array(0), X, ValueError, r"t must have shape \[B\]"),
        (X, jnp.array([0.0, 1.0, 2.0]), X, TypeError, r"t must be an integer array, got dtype float32"),
        (X, [0, 1, 2], X, TypeError, r"t must be an integer array of shape \[3\], got list"),
    ],
)
def test_q_sample_rejects(schedule, x0, t, noise, error, match):
    with pytest.raises(error, match=match):
        dj.q_sample(schedule, x0, t, noise)


def test_out_of_range_t_under_jit_is_not_checked_but_shapes_are(schedule):
    """Values are only known outside jit; shapes and dtypes are checked at trace time."""
    jax.jit(dj.q_sample)(schedule, X, jnp.array([0, 10, 50]), X)  # clamped, no error
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        jax.jit(dj.q_sample)(schedule, X, jnp.array([0, 1]), X)


def test_q_mean_variance_rejects(schedule):
    with pytest.raises(ValueError, match=r"x0 must have shape \[B, \.\.\.\]"):
        dj.q_mean_variance(schedule, jnp.zeros((4,)), jnp.array([0]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 49\]"):
        dj.q_mean_variance(schedule, X, jnp.array([0, 1, 99]))


def test_q_posterior_rejects(schedule):
    with pytest.raises(ValueError, match=r"shapes must match.*x0.*x_t"):
        dj.q_posterior_mean_variance(schedule, jnp.zeros((3, 4, 4, 1)), X, TS)
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, \.\.\.\] with rank >= 2"):
        dj.q_posterior_mean_variance(schedule, jnp.zeros((3,)), jnp.zeros((3,)), TS)


@pytest.mark.parametrize(
    "output_channels,variance,kwargs,error,match",
    [
        (
            2,
            "learned_range",
            {},
            ValueError,
            r"model output must have shape \(3, 4, 4, 4\) for variance='learned_range' \(prediction and variance",
        ),
        (4, "fixed_small", {}, ValueError, r"model output must have shape \(3, 4, 4, 2\) for variance='fixed_small'"),
        (2, "learned", {}, ValueError, r"unknown variance 'learned'; expected one of"),
        (
            2,
            "fixed_small",
            {"prediction": "score"},
            ValueError,
            r"unknown prediction 'score'; expected one of \('eps', 'x0', 'v'\)",
        ),
    ],
)
def test_p_mean_variance_rejects(schedule, output_channels, variance, kwargs, error, match):
    out = jnp.zeros(SHAPE[:-1] + (output_channels,))
    with pytest.raises(error, match=match):
        dj.p_mean_variance(schedule, out, X, TS, variance=variance, **kwargs)


def test_p_mean_variance_rejects_bad_x_t_and_t(schedule):
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, \.\.\.\]"):
        dj.p_mean_variance(schedule, jnp.zeros((5,)), jnp.zeros((5,)), jnp.array([0]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 49\]"):
        dj.p_mean_variance(schedule, X, X, jnp.array([0, 1, 50]))


@pytest.mark.parametrize("fn", [dj.prediction_target, dj.x0_from_prediction, dj.eps_from_prediction])
def test_prediction_conversions_reject_unknown_prediction(schedule, fn):
    with pytest.raises(ValueError, match=r"unknown prediction 'epsilon'"):
        fn(schedule, "epsilon", X, X, TS)


@pytest.mark.parametrize(
    "fn,args",
    [
        (dj.x0_from_eps, (X, TS, jnp.zeros((3, 4, 4, 1)))),
        (dj.eps_from_x0, (X, TS, jnp.zeros((4, 4, 2)))),
        (dj.x0_from_v, (X, TS, jnp.zeros((3, 4, 4, 1)))),
        (dj.eps_from_v, (X, TS, jnp.zeros((3, 1, 1, 2)))),
        (dj.v_from_x0_eps, (X, jnp.zeros((3, 4, 4, 1)), TS)),
        (lambda s, *a: dj.x0_from_prediction(s, "x0", *a), (X, TS, jnp.zeros((3, 4, 4, 1)))),
        (lambda s, *a: dj.eps_from_prediction(s, "eps", *a), (X, TS, jnp.zeros((3, 4, 4, 1)))),
        (lambda s, *a: dj.prediction_target(s, "eps", *a), (X, jnp.zeros((3, 4, 4, 1)), TS)),
    ],
)
def test_prediction_conversions_reject_broadcastable_shapes(schedule, fn, args):
    with pytest.raises(ValueError, match=r"shapes must match"):
        fn(schedule, *args)


def test_prediction_conversions_reject_out_of_range_t(schedule):
    with pytest.raises(ValueError, match=r"t must lie in"):
        dj.x0_from_eps(schedule, X, jnp.array([0, 1, 50]), X)


# --- Losses and bound ------------------------------------------------------------------------


def test_vlb_term_rejects(schedule):
    with pytest.raises(ValueError, match=r"shapes must match.*x0.*x_t"):
        dj.vlb_term(schedule, X, jnp.zeros((3, 4, 4, 1)), X, TS)
    with pytest.raises(ValueError, match=r"model output must have shape \(3, 4, 4, 4\)"):
        dj.vlb_term(schedule, X, X, X, TS, variance="learned_range")
    with pytest.raises(ValueError, match=r"unknown variance 'small'"):
        dj.vlb_term(schedule, X, X, X, TS, variance="small")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 49\]"):
        dj.vlb_term(schedule, X, X, X, jnp.array([0, 1, 50]))


def test_prior_bpd_rejects_unbatched_input(schedule):
    with pytest.raises(ValueError, match=r"x0 must have shape \[B, \.\.\.\] with rank >= 2, got shape \(5,\)"):
        dj.prior_bpd(schedule, jnp.zeros((5,)))


def test_min_snr_weight_rejects_unknown_prediction(schedule):
    with pytest.raises(ValueError, match=r"unknown prediction 'epsilon'"):
        dj.min_snr_weight(schedule, TS, gamma=5.0, prediction="epsilon")


def test_min_snr_weight_rejects_bad_gamma_and_t(schedule):
    with pytest.raises(ValueError, match=r"gamma must be positive, got -1"):
        dj.min_snr_weight(schedule, TS, gamma=-1.0, prediction="eps")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 49\], got values in \[-1, 50\]"):
        dj.min_snr_weight(schedule, jnp.array([-1, 50]), gamma=5.0, prediction="eps")
    with pytest.raises(ValueError, match=r"t must be an int array \[B\]"):
        dj.min_snr_weight(schedule, jnp.array(3), gamma=5.0, prediction="eps")


def test_min_snr_gamma_may_be_traced(schedule):
    # A traced gamma (e.g. swept under vmap or passed through jit) is not value-checked; the
    # result equals the concrete computation, and min(SNR, gamma) / SNR by hand.
    key = jax.random.PRNGKey(1)
    x0 = jax.random.uniform(key, SHAPE, minval=-1.0, maxval=1.0)
    noise = jax.random.normal(jax.random.fold_in(key, 1), SHAPE)
    model = lambda x, t: 0.5 * x
    traced = jax.jit(lambda g: dj.training_losses(model, schedule, x0, TS, noise, min_snr_gamma=g).loss)(2.0)
    concrete = dj.training_losses(model, schedule, x0, TS, noise).mse
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(TS)]
    snr = abar / (1.0 - abar)
    np.testing.assert_allclose(traced, concrete * np.minimum(snr, 2.0) / snr, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs,model,noise,t,error,match",
    [
        (
            {"loss": "l2"},
            zeros_model,
            X,
            TS,
            ValueError,
            r"unknown loss 'l2'; expected one of \('simple', 'vlb', 'hybrid'\)",
        ),
        ({"prediction": "score"}, zeros_model, X, TS, ValueError, r"unknown prediction 'score'"),
        ({"variance": "learned"}, zeros_model, X, TS, ValueError, r"unknown variance 'learned'"),
        ({"min_snr_gamma": 0.0}, zeros_model, X, TS, ValueError, r"min_snr_gamma must be positive or None, got 0\.0"),
        ({"min_snr_gamma": -5.0}, zeros_model, X, TS, ValueError, r"min_snr_gamma must be positive"),
        (
            {"variance": "learned_range", "loss": "hybrid"},
            zeros_model,
            X,
            TS,
            ValueError,
            r"model output must have shape \(3, 4, 4, 4\) for variance='learned_range'",
        ),
        (
            {},
            lambda x, t: jnp.zeros(x.shape[:-1] + (1,)),
            X,
            TS,
            ValueError,
            r"model output must have shape \(3, 4, 4, 2\)",
        ),
        ({}, zeros_model, jnp.zeros((3, 4, 4, 1)), TS, ValueError, r"shapes must match.*noise"),
        ({}, zeros_model, X, jnp.array([0, 1, 50]), ValueError, r"t must lie in \[0, 49\]"),
        ({}, zeros_model, X, jnp.array([0.0, 1.0, 2.0]), TypeError, r"t must be an integer array"),
    ],
)
def test_training_losses_rejects(schedule, kwargs, model, noise, t, error, match):
    with pytest.raises(error, match=match):
        dj.training_losses(model, schedule, X, t, noise, **kwargs)


@pytest.mark.parametrize("call", ["loss", "nll", "sample"])
def test_a_model_fn_returning_a_tuple_is_named(schedule, call):
    """A Flax apply with mutable=[...] returns (output, state)."""
    model = lambda x, t: (jnp.zeros_like(x), {"batch_stats": {}})  # noqa: E731
    with pytest.raises(TypeError, match=r"model_fn must return an array, got tuple \(a Flax apply"):
        if call == "loss":
            dj.training_losses(model, schedule, X, TS, X)
        elif call == "nll":
            dj.nll_bpd(model, schedule, jnp.round((X + 1.0) * 127.5) / 127.5 - 1.0, jax.random.PRNGKey(0))
        else:
            dj.sample(model, schedule, X.shape, jax.random.PRNGKey(0), num_steps=2)


def test_training_losses_rejects_unbatched_x0(schedule):
    with pytest.raises(ValueError, match=r"x0 must have shape \[B, \.\.\.\] with rank >= 2, got shape \(4,\)"):
        dj.training_losses(zeros_model, schedule, jnp.zeros((4,)), jnp.array([0]), jnp.zeros((4,)))


def test_nll_bpd_rejects(schedule):
    with pytest.raises(ValueError, match=r"x0 must have shape \[B, \.\.\.\]"):
        dj.nll_bpd(zeros_model, schedule, jnp.zeros((4,)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"unknown prediction 'score'"):
        dj.nll_bpd(zeros_model, schedule, X, jax.random.PRNGKey(0), prediction="score")
    on_grid = jnp.round((X + 1.0) * 127.5) / 127.5 - 1.0
    with pytest.raises(ValueError, match=r"model output must have shape \(3, 4, 4, 4\)"):
        dj.nll_bpd(zeros_model, schedule, on_grid, jax.random.PRNGKey(0), variance="learned_range")
    # Data not scaled to the 8-bit grid in [-1, 1]: out of range, and [0, 1] data (k / 255).
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\], got values in \[0, 255\]"):
        dj.nll_bpd(zeros_model, schedule, jnp.full((3, 4, 4, 1), 255.0).at[0].set(0.0), jax.random.PRNGKey(0))
    in_unit = jnp.arange(48, dtype=jnp.float32).reshape(3, 4, 4, 1) / 255.0
    with pytest.raises(ValueError, match=r"8-bit grid .* 0.5 bins off it"):
        dj.nll_bpd(zeros_model, schedule, in_unit, jax.random.PRNGKey(0))
    # The same values rescaled to [-1, 1] are accepted (a finite bound).
    assert np.isfinite(np.asarray(dj.nll_bpd(zeros_model, schedule, in_unit * 255.0 / 127.5 - 1.0,
                                             jax.random.PRNGKey(0)).total)).all()


# --- Timestep sampling ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [(0, 10), (10, 0), (-1, 3)])
def test_init_loss_history_rejects(args):
    with pytest.raises(ValueError, match=r"need num_timesteps >= 1 and history_per_term >= 1"):
        dj.init_loss_history(*args)


def test_update_loss_history_rejects_mismatched_shapes():
    h = dj.init_loss_history(4, 2)
    with pytest.raises(ValueError, match=r"t and losses must both be \[B\], got \(3,\) and \(2,\)"):
        dj.update_loss_history(h, jnp.array([0, 1, 2]), jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"t and losses must both be \[B\]"):
        dj.update_loss_history(h, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2)))


def test_update_loss_history_rejects_out_of_range_t():
    # Out-of-range rows would be clamped to T - 1 or dropped by the scatter.
    with pytest.raises(ValueError, match=r"t must lie in \[0, 3\], got values in \[-1, 5\]"):
        dj.update_loss_history(dj.init_loss_history(4, 2), jnp.array([-1, 5]), jnp.array([1.0, 2.0]))


@pytest.mark.parametrize("batch_size", [0, -2, 2.0, True])
def test_sample_timesteps_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
        dj.sample_timesteps(jax.random.PRNGKey(0), batch_size, 10)


def test_sample_timesteps_rejects_history_of_another_T():
    with pytest.raises(ValueError, match=r"history has 4 timesteps, expected 10"):
        dj.sample_timesteps(jax.random.PRNGKey(0), 8, 10, dj.init_loss_history(4, 2))


# --- Sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            {"sampler": "euler"},
            ValueError,
            r"unknown sampler 'euler'; expected one of \('ddpm', 'ddim', 'dpm_solver\+\+'\)",
        ),
        (
            {"spacing": "quadratic", "num_steps": 10},
            ValueError,
            r"unknown spacing 'quadratic'; expected one of \('time', 'log_snr'\)",
        ),
        ({"prediction": "score"}, ValueError, r"unknown prediction 'score'"),
        ({"variance": "learned"}, ValueError, r"unknown variance 'learned'"),
        ({"sampler": "ddim", "eta": -0.1}, ValueError, r"eta must lie in \[0, 1\], got -0\.1"),
        ({"sampler": "ddim", "eta": 1.5}, ValueError, r"eta must lie in \[0, 1\], got 1\.5"),
        ({"x_T": jnp.zeros((3, 4, 4, 1))}, ValueError, r"x_T must have shape \(3, 4, 4, 2\), got \(3, 4, 4, 1\)"),
        ({"num_steps": T + 1}, ValueError, rf"num_steps must be in \[1, {T}\], got {T + 1}"),
        ({"num_steps": T + 1, "spacing": "log_snr"}, ValueError, rf"num_steps must be in \[1, {T}\]"),
        ({"num_steps": 0}, ValueError, rf"num_steps must be in \[1, {T}\], got 0"),
        ({"num_steps": 10.0}, TypeError, r"num_steps must be an int or None, got 10\.0"),
        ({"num_steps": True}, TypeError, r"num_steps must be an int or None"),
        # Options a sampler would ignore.
        ({"eta": 0.5}, ValueError, r"eta=0\.5 applies to sampler='ddim' only; 'ddpm' has no eta"),
        ({"sampler": "dpm_solver++", "eta": 1.0}, ValueError, r"'dpm_solver\+\+' has no eta"),
        ({"sampler": "ddim", "spacing": "log_snr"}, ValueError, r"spacing='log_snr' chooses the rows kept by num_steps"),
        ({"x_T": jnp.zeros(SHAPE, jnp.int32)}, TypeError, r"x_T must be a floating-point array"),
    ],
)
def test_sample_rejects(schedule, kwargs, error, match):
    with pytest.raises(error, match=match):
        dj.sample(zeros_model, schedule, SHAPE, jax.random.PRNGKey(0), **kwargs)


@pytest.mark.parametrize("shape", [(8,), (0, 4), (3, -1)])
def test_sample_rejects_bad_shape(schedule, shape):
    with pytest.raises(ValueError, match=r"shape must be \[B, \.\.\.\] with rank >= 2 and positive sizes"):
        dj.sample(zeros_model, schedule, shape, jax.random.PRNGKey(0))


def test_sample_rejects_a_shape_of_non_integers(schedule):
    with pytest.raises(TypeError, match=r"shape must be a sequence of ints, got \(2\.7, 4, 4, 1\)"):
        dj.sample(zeros_model, schedule, (2.7, 4, 4, 1), jax.random.PRNGKey(0))


def one_channel_model(x, t):
    return jnp.zeros_like(x[..., :1])


def double_channel_model(x, t):
    return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver++"])
@pytest.mark.parametrize(
    "model,variance,expected",
    [
        (zeros_model, "learned_range", r"\(3, 4, 4, 4\) for variance='learned_range'"),  # C channels, 2C needed
        (one_channel_model, "fixed_small", r"\(3, 4, 4, 2\) for variance='fixed_small'.*got \(3, 4, 4, 1\)"),
        (double_channel_model, "fixed_small", r"\(3, 4, 4, 2\) for variance='fixed_small'.*got \(3, 4, 4, 4\)"),
    ],
)
def test_sample_rejects_model_output_of_wrong_shape(schedule, sampler, model, variance, expected):
    # Every sampler checks before it runs: a broadcastable wrong output must not be sampled with.
    with pytest.raises(ValueError, match=r"model output must have shape " + expected):
        dj.sample(model, schedule, SHAPE, jax.random.PRNGKey(0), sampler=sampler, num_steps=4, variance=variance)


def cond_model(x, t, y):
    return jnp.zeros_like(x)


@pytest.mark.parametrize(
    "labels,kwargs,match",
    [
        (jnp.array([0, 1, 2]), {"guidance_scale": -1.0}, r"guidance_scale must be >= 0, got -1\.0"),
        (jnp.array([0.0, 1.0, 2.0]), {"guidance_scale": 1.0}, r"labels must be an int \[B\] array"),
        (
            jnp.zeros((3, 1), jnp.int32),
            {"guidance_scale": 1.0},
            r"labels must be an int \[B\] array, got shape \(3, 1\)",
        ),
        (jnp.array([0, 1, 2]), {"guidance_scale": 1.0, "variance": "learned"}, r"unknown variance 'learned'"),
    ],
)
def test_classifier_free_guidance_rejects(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dj.classifier_free_guidance(cond_model, labels, null_label=10, **kwargs)


def test_classifier_free_guidance_rejects_a_bad_null_label():
    """Inside the sampler's scan the labels are traced, and an embedding lookup out of range is
    NaN (or, for -1, silently the last row): the null label is checked where it is given."""
    with pytest.raises(ValueError, match=r"null_label must be >= 0, got -1"):
        dj.classifier_free_guidance(cond_model, jnp.array([0, 1]), guidance_scale=1.0, null_label=-1)
    with pytest.raises(TypeError, match=r"null_label must be an int, got float 10\.0"):
        dj.classifier_free_guidance(cond_model, jnp.array([0, 1]), guidance_scale=1.0, null_label=10.0)


def test_guided_model_rejects_batch_mismatch():
    guided = dj.classifier_free_guidance(cond_model, jnp.array([0, 1]), guidance_scale=1.0, null_label=10)
    with pytest.raises(ValueError, match=r"batch of x \(3\) must match the number of labels \(2\)"):
        guided(X, TS)


# --- Learned schedule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_timesteps": 0}, r"num_timesteps must be >= 1, got 0"),
        (
            {"num_timesteps": 10, "log_snr_max_init": -5.0, "log_snr_min_init": 5.0},
            r"log_snr_max_init \(-5\.0\) must exceed log_snr_min_init \(5\.0\)",
        ),
    ],
)
def test_learned_schedule_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dj.LearnedSchedule(hidden_features=4, **kwargs).init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("step,error", [(True, TypeError), (1.0, TypeError), ("3", TypeError), (-1, ValueError)])
def test_step_numbers_must_be_non_negative_ints(step, error):
    from diffusion_jax._checks import as_step

    with pytest.raises(error, match="step must be"):
        as_step(step)


@pytest.mark.parametrize("step", [0, 7, np.int64(12)])
def test_step_numbers_come_back_as_python_ints(step):
    from diffusion_jax._checks import as_step

    got = as_step(step)
    assert got == int(step) and type(got) is int


@pytest.mark.parametrize("sampler", ["ddpm", "dpm_solver++"])
def test_a_traced_eta_is_refused_where_it_would_be_ignored(schedule, sampler):
    with pytest.raises(ValueError, match=rf"a traced eta applies to sampler='ddim' only; '{re.escape(sampler)}'"):
        jax.jit(lambda eta: dj.sample(zeros_model, schedule, X.shape, jax.random.PRNGKey(0), sampler=sampler,
                                      num_steps=2, eta=eta))(0.5)
    traced = jax.jit(lambda eta: dj.sample(zeros_model, schedule, X.shape, jax.random.PRNGKey(0), sampler="ddim",
                                           num_steps=2, eta=eta))(0.5)
    eager = dj.sample(zeros_model, schedule, X.shape, jax.random.PRNGKey(0), sampler="ddim", num_steps=2, eta=0.5)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(eager), rtol=1e-5, atol=1e-6)


def test_make_schedule_takes_numpy_and_jax_integer_counts():
    reference = dj.make_schedule("cosine", 10)
    for count in (np.int64(10), jnp.int32(10)):
        schedule = dj.make_schedule("cosine", count)
        assert schedule.num_timesteps == 10
        np.testing.assert_array_equal(np.asarray(schedule.betas), np.asarray(reference.betas))
