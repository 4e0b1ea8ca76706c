"""The data-parallel training step: device-count invariance, non-finite skips, EMA.

Runs on the 8 simulated CPU devices of conftest.py. The model is a tiny UNet
on 4x4 images so each compile takes seconds.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import diffusion_jax as dj
from diffusion_jax import parallel
from diffusion_jax.models import UNet, UNetConfig
from diffusion_jax.training.state import OptimConfig, create_train_state, ema_update, make_optimizer
from diffusion_jax.training.step import LossConfig, make_multi_step, make_train_step

T = 100
GLOBAL_BATCH = 16
EMA_DECAY = 0.9
PEAK_LR = 1e-3
WARMUP = 4


def _batch(seed=1, nan_example=None):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (GLOBAL_BATCH, 4, 4, 1)).astype(np.float32)
    if nan_example is not None:
        images[nan_example] = np.nan
    return {"image": images, "label": rng.integers(0, 3, GLOBAL_BATCH).astype(np.int32)}


@pytest.fixture(scope="module")
def setup():
    """A conditional model with label dropout, hybrid loss, learned variance and importance sampling.

    Every code path of the step that touches randomness or crosses devices.
    """
    model = UNet(UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                            out_channels=2, num_classes=3))
    schedule = dj.make_schedule("linear", T)
    tx, lr = make_optimizer(OptimConfig(learning_rate=PEAK_LR, warmup_steps=WARMUP, grad_clip=1.0))
    loss_config = LossConfig(loss="hybrid", variance="learned_range", timestep_sampler="importance",
                             num_classes=3, cond_drop_rate=0.3)
    step_fn = make_train_step(model, schedule, tx, lr, ema_decay=EMA_DECAY, loss_config=loss_config)
    x = jnp.zeros((1, 4, 4, 1))
    params = model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1,), jnp.int32), train=False)["params"]
    # history_per_term=1 so the importance sampler leaves its uniform warm-up
    # within the test's steps and really draws from the history.
    state = create_train_state(params, tx, loss_history=dj.init_loss_history(T, history_per_term=1))
    return step_fn, state


def _mapped(step_fn, mesh):
    return parallel.data_parallel(step_fn, mesh, in_specs=(P(), P("data"), P()), out_specs=(P(), P()))


def _run(fn, state, mesh, batches):
    state = parallel.replicate(state, mesh)
    key = jax.random.PRNGKey(42)
    metrics = []
    for batch in batches:
        state, m = fn(state, parallel.shard_batch(batch, mesh), key)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


@pytest.fixture(scope="module")
def eight_device_mesh():
    assert jax.device_count() == 8, "conftest.py should give 8 simulated CPU devices"
    return parallel.make_mesh()


@pytest.fixture(scope="module")
def step_on_eight(setup, eight_device_mesh):
    """The jitted step on 8 devices, compiled once for the module."""
    return _mapped(setup[0], eight_device_mesh)


def test_same_step_on_one_and_eight_devices(setup, eight_device_mesh, step_on_eight):
    step_fn, state = setup
    batches = [_batch(seed) for seed in range(3)]
    one_device_mesh = parallel.make_mesh(jax.devices()[:1])
    one, metrics_one = _run(_mapped(step_fn, one_device_mesh), state, one_device_mesh, batches)
    eight, metrics_eight = _run(step_on_eight, state, eight_device_mesh, batches)

    assert int(one.step) == int(eight.step) == 3
    # The importance sampler left its warm-up: the history saw every batch.
    assert int(np.sum(eight.loss_history.counts)) == 3 * GLOBAL_BATCH
    for name in ("params", "ema_params", "opt_state", "loss_history"):
        jax.tree.map(lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name),
                     getattr(one, name), getattr(eight, name))
    for m1, m8 in zip(metrics_one, metrics_eight):
        for key in ("loss", "grad_norm", "loss_q0", "loss_q3"):
            np.testing.assert_allclose(m1[key], m8[key], rtol=1e-5, err_msg=key)
    # The step really trained something.
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), one.params,
                                         jax.device_get(state.params)))
    assert max(moved) > 1e-4


def test_nonfinite_batch_skips_the_update_and_is_counted(setup, eight_device_mesh, step_on_eight):
    _, state = setup
    mesh, fn = eight_device_mesh, step_on_eight
    key = jax.random.PRNGKey(0)
    state = parallel.replicate(state, mesh)
    state, _ = fn(state, parallel.shard_batch(_batch(0), mesh), key)
    before = jax.device_get(state)

    # One NaN image on one device poisons the global mean loss.
    state, metrics = fn(state, parallel.shard_batch(_batch(1, nan_example=5), mesh), key)
    after = jax.device_get(state)
    assert not np.isfinite(metrics["loss"])
    assert float(metrics["nonfinite"]) == 1.0
    assert int(after.step) == int(before.step) + 1
    assert int(after.nonfinite_count) == 1 and int(after.consecutive_nonfinite) == 1
    for name in ("params", "ema_params", "opt_state", "loss_history"):
        jax.tree.map(lambda a, b, name=name: np.testing.assert_array_equal(a, b, err_msg=name),
                     getattr(before, name), getattr(after, name))

    state, _ = fn(state, parallel.shard_batch(_batch(1, nan_example=0), mesh), key)
    assert int(state.consecutive_nonfinite) == 2
    # A good batch updates again, resets the run of skips, keeps the total.
    state, metrics = fn(state, parallel.shard_batch(_batch(2), mesh), key)
    final = jax.device_get(state)
    assert float(metrics["nonfinite"]) == 0.0
    assert int(final.nonfinite_count) == 2 and int(final.consecutive_nonfinite) == 0
    assert not np.array_equal(final.params["conv_out"]["kernel"], after.params["conv_out"]["kernel"])
    # Skipped steps do not advance the schedule: this is the 2nd applied update,
    # made with the warmup's lr(1) = PEAK_LR * 1 / WARMUP.
    np.testing.assert_allclose(metrics["lr"], PEAK_LR * 1 / WARMUP, rtol=1e-6)


def test_several_steps_per_call_are_the_single_steps(setup, eight_device_mesh, step_on_eight):
    """Four steps in one scanned call (a NaN batch among them, skipped inside the
    scan) give the state and the per-step metrics of four calls of one step."""
    step_fn, state = setup
    mesh = eight_device_mesh
    batches = [_batch(0), _batch(1, nan_example=3), _batch(2), _batch(3)]
    single, single_metrics = _run(step_on_eight, state, mesh, batches)

    four = parallel.data_parallel(make_multi_step(step_fn, 4), mesh, in_specs=(P(), P(None, "data"), P()),
                                  out_specs=(P(), P()))
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
    multi, multi_metrics = four(parallel.replicate(state, mesh),
                                parallel.shard_batch(stacked, mesh, stacked=True), jax.random.PRNGKey(42))
    multi, multi_metrics = jax.device_get((multi, multi_metrics))

    assert int(multi.step) == 4 and int(multi.nonfinite_count) == int(single.nonfinite_count) == 1
    for name in ("params", "ema_params", "opt_state", "loss_history"):
        jax.tree.map(lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name),
                     getattr(single, name), getattr(multi, name))
    for key in ("loss", "grad_norm", "lr", "nonfinite", "consecutive_nonfinite"):
        assert multi_metrics[key].shape == (4,), key
        np.testing.assert_allclose(multi_metrics[key], [m[key] for m in single_metrics], rtol=1e-5, err_msg=key)
    assert list(multi_metrics["nonfinite"]) == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("devices, microbatches", [(8, 2), (1, 4)])
def test_microbatches_give_the_update_of_the_whole_batch(setup, eight_device_mesh, step_on_eight,
                                                         devices, microbatches):
    """Gradient accumulation: each device's block split into micro-batches (down to one
    example on 8 devices) gives the state and metrics of the whole-batch step: the same
    timesteps, noise and dropped labels (drawn per example), and the mean of the parts'
    gradients is the whole batch's (hybrid loss, importance sampling, label dropout)."""
    _, state = setup
    batches = [_batch(seed) for seed in range(3)]
    whole, whole_metrics = _run(step_on_eight, state, eight_device_mesh, batches)
    model = UNet(UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                            out_channels=2, num_classes=3))
    tx, lr = make_optimizer(OptimConfig(learning_rate=PEAK_LR, warmup_steps=WARMUP, grad_clip=1.0))
    loss_config = LossConfig(loss="hybrid", variance="learned_range", timestep_sampler="importance",
                             num_classes=3, cond_drop_rate=0.3)
    micro_fn = make_train_step(model, dj.make_schedule("linear", T), tx, lr, ema_decay=EMA_DECAY,
                               loss_config=loss_config, num_microbatches=microbatches)
    mesh = parallel.make_mesh(jax.devices()[:devices])
    parts, parts_metrics = _run(_mapped(micro_fn, mesh), state, mesh, batches)

    assert int(parts.step) == 3 and int(np.sum(parts.loss_history.counts)) == 3 * GLOBAL_BATCH
    for name in ("params", "ema_params", "opt_state", "loss_history"):
        jax.tree.map(lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name),
                     getattr(whole, name), getattr(parts, name))
    for m1, m2 in zip(whole_metrics, parts_metrics):
        for key in ("loss", "mse", "vlb", "grad_norm", "loss_q0", "loss_q3", "lr"):
            np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, err_msg=key)


def test_microbatches_of_a_learned_schedule_and_their_checks():
    """The schedule's parameters get the whole batch's gradient too; a bad count, or a
    device batch it does not divide, is refused by name."""
    model = UNet(UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0))
    schedule = dj.LearnedSchedule(T, hidden_features=8)
    # Plain SGD: the update is the gradient itself (Adam's first update, g / (|g| + eps),
    # would magnify rounding on near-zero gradients).
    tx, lr = optax.sgd(1e-2), optax.constant_schedule(1e-2)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,), jnp.int32),
                        None, train=False)["params"]
    state = create_train_state(params, tx, schedule_params=schedule.init(jax.random.PRNGKey(1))["params"])
    mesh = parallel.make_mesh(jax.devices()[:2])
    batch = parallel.shard_batch({"image": _batch()["image"]}, mesh)  # 8 examples per device
    results = []
    for microbatches in (1, 8):
        step_fn = make_train_step(model, schedule, tx, lr, ema_decay=EMA_DECAY, loss_config=LossConfig(loss="vlb"),
                                  num_microbatches=microbatches)
        results.append(jax.device_get(_mapped(step_fn, mesh)(state, batch, jax.random.PRNGKey(0))))
    (whole, whole_metrics), (parts, parts_metrics) = results
    assert not np.allclose(whole.schedule_params["log_snr_max"], state.schedule_params["log_snr_max"])
    for name in ("params", "schedule_params", "ema_schedule_params", "opt_state"):
        jax.tree.map(lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name),
                     getattr(whole, name), getattr(parts, name))
    np.testing.assert_allclose(whole_metrics["vlb"], parts_metrics["vlb"], rtol=1e-5)

    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="num_microbatches must be an int >= 1"):
            make_train_step(model, schedule, tx, lr, ema_decay=EMA_DECAY, loss_config=LossConfig(loss="vlb"),
                            num_microbatches=bad)
    step_fn = make_train_step(model, schedule, tx, lr, ema_decay=EMA_DECAY, loss_config=LossConfig(loss="vlb"),
                              num_microbatches=3)
    with pytest.raises(ValueError, match="num_microbatches=3 does not divide this device's batch of 8"):
        _mapped(step_fn, mesh)(state, batch, jax.random.PRNGKey(0))


def test_multi_step_rejects_a_bad_count_and_mismatched_batches(setup, eight_device_mesh):
    step_fn, state = setup
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_steps"):
            make_multi_step(step_fn, bad)
    three = parallel.data_parallel(make_multi_step(step_fn, 3), eight_device_mesh,
                                   in_specs=(P(), P(None, "data"), P()), out_specs=(P(), P()))
    two_batches = jax.tree.map(lambda *xs: np.stack(xs), _batch(0), _batch(1))
    with pytest.raises(ValueError, match="leading axis of 3"):
        three(parallel.replicate(state, eight_device_mesh),
              parallel.shard_batch(two_batches, eight_device_mesh, stacked=True), jax.random.PRNGKey(0))


def test_ema_follows_the_closed_form(setup, eight_device_mesh, step_on_eight):
    _, state = setup
    mesh, fn = eight_device_mesh, step_on_eight
    state = parallel.replicate(state, mesh)
    state, _ = fn(state, parallel.shard_batch(_batch(0), mesh), jax.random.PRNGKey(0))
    old = jax.device_get(state)
    state, _ = fn(state, parallel.shard_batch(_batch(1), mesh), jax.random.PRNGKey(0))
    new = jax.device_get(state)
    # ema' = d ema + (1 - d) params', with params' the updated parameters.
    jax.tree.map(lambda e0, p1, e1: np.testing.assert_allclose(
        e1, EMA_DECAY * e0 + (1 - EMA_DECAY) * p1, rtol=1e-6, atol=1e-7),
        old.ema_params, new.params, new.ema_params)


def test_ema_update_by_hand():
    ema = {"w": jnp.array([1.0, 2.0])}
    new = {"w": jnp.array([3.0, 5.0])}
    out = jax.jit(ema_update)(ema, new, 0.9)
    np.testing.assert_allclose(out["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 5], rtol=1e-6)


def test_learning_rate_warmup_and_cosine_by_hand():
    tx, lr = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=10, decay="cosine",
                                        total_steps=110))
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    # Half way through the decay: 1e-3 * (1 + cos(pi / 2)) / 2.
    np.testing.assert_allclose(lr(60), 5e-4, rtol=1e-5)
    np.testing.assert_allclose(lr(110), 0.0, atol=1e-9)
    assert isinstance(tx, optax.GradientTransformation)


def test_clipping_on_or_off_keeps_the_optimizer_state_structure():
    """So a run resumes with optim.grad_clip changed; without clipping the update is Adam's alone."""
    params = {"w": jnp.array([3.0, -4.0]), "b": jnp.array(0.5)}
    grads = {"w": jnp.array([30.0, -40.0]), "b": jnp.array(0.0)}  # global norm 50
    clipped, _ = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0, grad_clip=1.0))
    plain, _ = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0, grad_clip=None))
    zero, _ = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0, grad_clip=0.0))
    structures = {jax.tree.structure(tx.init(params)) for tx in (clipped, plain, zero)}
    assert len(structures) == 1
    reference = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    want, _ = reference.update(grads, reference.init(params), params)
    for tx in (plain, zero):
        got, _ = tx.update(grads, tx.init(params), params)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)


@pytest.mark.parametrize("field,value", [
    ("learning_rate", float("inf")), ("learning_rate", float("nan")), ("grad_clip", float("nan")),
    ("grad_clip", float("inf")), ("weight_decay", float("nan")), ("eps", float("inf")),
])
def test_optim_config_rejects_non_finite_numbers(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        OptimConfig(**{field: value})


def test_optim_config_rejects_bad_values():
    with pytest.raises(ValueError, match="decay"):
        OptimConfig(decay="linear")
    with pytest.raises(ValueError, match="b2"):
        OptimConfig(b2=1.0)


def test_label_dropout_needs_classes():
    with pytest.raises(ValueError, match="num_classes"):
        LossConfig(cond_drop_rate=0.1)


def test_cosine_decay_needs_the_length_of_the_run():
    """With total_steps left at its default the rate was 0 from the end of the warmup on."""
    with pytest.raises(ValueError, match=r"decay='cosine'.*total_steps=1, warmup_steps=5000"):
        OptimConfig(decay="cosine")
    with pytest.raises(ValueError, match=r"total_steps=10, warmup_steps=10"):
        OptimConfig(decay="cosine", warmup_steps=10, total_steps=10)
    OptimConfig(decay="constant")  # needs no length


def _toy_step(timestep_sampler="uniform", ema_decay=0.5, num_classes=None):
    model = UNet(UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                            num_classes=num_classes))
    tx, lr = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=0))
    return model, tx, make_train_step(model, dj.make_schedule("linear", T), tx, lr, ema_decay=ema_decay,
                                      loss_config=LossConfig(timestep_sampler=timestep_sampler,
                                                             num_classes=num_classes))


@pytest.mark.parametrize("decay", [1.5, -0.1, float("nan"), True])
def test_make_train_step_rejects_a_bad_ema_decay(decay):
    with pytest.raises(ValueError, match=r"ema_decay must lie in \[0, 1\]"):
        _toy_step(ema_decay=decay)


def _toy_state(model, tx, history=None):
    y = None if model.config.num_classes is None else jnp.zeros((1,), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,), jnp.int32),
                        y, train=False)["params"]
    return create_train_state(params, tx, loss_history=history)


@pytest.mark.parametrize("sampler, with_history, match", [
    ("importance", False, r"timestep_sampler='importance' but the state has no loss_history"),
    ("uniform", True, r"timestep_sampler='uniform' but the state has a loss_history"),
])
def test_the_timestep_sampler_and_the_loss_history_must_agree(sampler, with_history, match):
    """The step sampled by importance exactly when the state had a history, whatever the config said."""
    model, tx, step_fn = _toy_step(timestep_sampler=sampler)
    state = _toy_state(model, tx, dj.init_loss_history(T) if with_history else None)
    mesh = parallel.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match=match):
        _mapped(step_fn, mesh)(state, parallel.shard_batch(_batch(), mesh), jax.random.PRNGKey(0))


def test_an_unconditional_batch_needs_no_label_and_the_step_names_its_axis():
    model, tx, step_fn = _toy_step()
    state = _toy_state(model, tx)
    mesh = parallel.make_mesh(jax.devices()[:1])
    batch = {"image": _batch()["image"]}
    new_state, metrics = _mapped(step_fn, mesh)(state, parallel.shard_batch(batch, mesh), jax.random.PRNGKey(0))
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert "mse" in metrics and "vlb" not in metrics  # loss="simple" computes no bound
    with pytest.raises(ValueError, match=r"needs a mesh axis named 'data'"):
        jax.jit(step_fn)(state, batch, jax.random.PRNGKey(0))
    model, tx, step_fn = _toy_step(num_classes=3)
    with pytest.raises(ValueError, match=r"num_classes=3\) needs batch\['label'\]"):
        _mapped(step_fn, mesh)(_toy_state(model, tx), parallel.shard_batch(batch, mesh), jax.random.PRNGKey(0))


def test_a_learned_schedule_is_averaged_like_the_model():
    """ema' = d ema + (1 - d) new, for the schedule's parameters too (VDM averages its whole
    model); evaluation and sampling read the two averages together (TrainState.eval_params)."""
    model = UNet(UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0))
    schedule = dj.LearnedSchedule(T, hidden_features=8)
    tx, lr = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0))
    step_fn = make_train_step(model, schedule, tx, lr, ema_decay=EMA_DECAY, loss_config=LossConfig(loss="vlb"))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,), jnp.int32),
                        None, train=False)["params"]
    state = create_train_state(params, tx, schedule_params=schedule.init(jax.random.PRNGKey(1))["params"])
    chex.assert_trees_all_equal(state.ema_schedule_params, state.schedule_params)
    mesh = parallel.make_mesh(jax.devices()[:1])
    mapped = _mapped(step_fn, mesh)
    batch = parallel.shard_batch({"image": _batch()["image"]}, mesh)
    for _ in range(2):
        old = state
        state, _ = mapped(state, batch, jax.random.PRNGKey(0))
        assert not np.allclose(np.asarray(old.schedule_params["log_snr_max"]),
                               np.asarray(state.schedule_params["log_snr_max"]))  # it trains
        jax.tree.map(lambda e, o, n: np.testing.assert_allclose(e, EMA_DECAY * o + (1 - EMA_DECAY) * n,
                                                                rtol=1e-6, atol=1e-7),
                     state.ema_schedule_params, old.ema_schedule_params, state.schedule_params)
    ema_params, ema_schedule = state.eval_params
    assert ema_params is state.ema_params and ema_schedule is state.ema_schedule_params
    # A state built without the average (by hand) evaluates with the latest schedule.
    assert state.replace(ema_schedule_params=None).eval_params[1] is state.schedule_params


def test_replicate_takes_typed_and_raw_keys(eight_device_mesh):
    """A typed key (jax.random.key) has no NumPy form; it is replicated through its key data."""
    typed, raw = jax.random.key(7), jax.random.PRNGKey(7)
    out = parallel.replicate({"typed": typed, "raw": raw}, eight_device_mesh)
    assert jax.dtypes.issubdtype(out["typed"].dtype, jax.dtypes.prng_key)
    assert out["typed"].sharding.is_fully_replicated and len(out["typed"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(out["typed"])), np.asarray(jax.random.key_data(typed)))
    np.testing.assert_array_equal(np.asarray(out["raw"]), np.asarray(raw))
    # The same draws as the key it came from.
    np.testing.assert_array_equal(np.asarray(jax.random.normal(out["typed"], (3,))),
                                  np.asarray(jax.random.normal(typed, (3,))))
