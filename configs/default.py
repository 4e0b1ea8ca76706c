"""The whole config schema, every field documented once.

Every other config in this folder imports this one and overrides a few
fields. Any field can be overridden on the command line:

    python train.py --config=configs/cifar10.py --workdir=runs/c10 \
        --config.batch_size=256 --config.model.dropout=0.2 --config.sample.num_steps=None

`diffusion_jax.training.trainer.validate_config` checks every field before
anything compiles. The defaults here are the DDPM CIFAR-10 recipe (Ho et al.
2020, App. B), so `cifar10.py` changes only the dataset.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # --- The fields set most often -------------------------------------------
    # Training steps in all (the run stops at this step, resuming if needed).
    config.num_train_steps = 800_000
    # Global batch size, summed over all devices and processes; must be
    # divisible by both counts.
    config.batch_size = 128
    # Seeds parameter init, per-step noise/timesteps/dropout and data order.
    config.seed = 0
    # Console progress, TensorBoard scalars and the non-finite check, every N steps.
    config.log_every_steps = 100
    # A checkpoint every N steps (also one at the end and one on SIGTERM/SIGINT).
    config.checkpoint_every_steps = 5_000
    # Periodic evaluation every N steps (0: never): NLL on
    # `eval.num_batches_during_training` test batches and a sample grid.
    config.eval_every_steps = 20_000

    # --- Training ---------------------------------------------------------------
    # Exponential moving average of the parameters, used for eval and sampling.
    config.ema_decay = 0.9999
    # Stop with an error after K updates in a row were skipped because the
    # loss or gradient was NaN/Inf (checked at log steps, so the run may go up
    # to log_every_steps - 1 steps past K). The last checkpoint is kept.
    config.max_consecutive_nonfinite = 20
    # Probability of replacing a label with the null class during training,
    # for classifier-free guidance (Ho & Salimans 2022). Needs model.num_classes.
    # A conditional model's NLL is that of the unconditional model (the null
    # class) when > 0, and of p(x | label) when 0.
    config.cond_drop_rate = 0.0
    # jax.distributed.initialize: "true", "false", or "auto": when a launcher's
    # environment says the job has several processes (JAX_COORDINATOR_ADDRESS,
    # SLURM_NTASKS > 1, ...; parallel.launched_as_multi_process). A string, so
    # that --config.distributed=false works; True and False work in Python.
    config.distributed = "auto"
    # Compute dtype of the UNet: "float32" or "bfloat16" (params stay float32).
    config.compute_dtype = "float32"
    # Training steps per call to the devices (one lax.scan over that many
    # batches): fewer dispatches from the host where a step is short (small
    # models, fast accelerators); the same updates as one step per call.
    # log_every_steps, checkpoint_every_steps and eval_every_steps must be
    # multiples of it; SIGTERM/SIGINT stop after the call in flight. For GPUs
    # and TPUs: on the CPU backend several steps per call run slower (README).
    config.steps_per_dispatch = 1
    # Gradient accumulation: each device's share of batch_size is split into
    # this many micro-batches, run one after another (a lax.scan) and their
    # gradients summed before the one update: the activation memory of
    # batch_size / num_microbatches examples at once, the update of the whole
    # batch (to float32 rounding; dropout masks are drawn per micro-batch).
    # batch_size must be divisible by devices x num_microbatches. May change
    # on resume (e.g. to fit a smaller accelerator).
    config.num_microbatches = 1

    # --- Data (diffusion_jax.input_pipeline.DataConfig) --------------------------
    config.data = ml_collections.ConfigDict()
    # A TFDS dataset prepared as array_record ("cifar10", "mnist", ...),
    # "digits" (scikit-learn's digits, offline) or "folder" (images in data_dir).
    config.data.name = "cifar10"
    # TFDS data_dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets); the image
    # folder for "folder".
    config.data.data_dir = config_dict.placeholder(str)
    # Images are center-cropped and resized to image_size x image_size; must
    # be divisible by 2 ** (len(model.ch_mult) - 1).
    config.data.image_size = 32
    # Random horizontal flips of training images.
    config.data.random_flip = True
    config.data.train_split = "train"
    config.data.eval_split = "test"
    # Worker processes decoding training batches (grain; 0: threads of the
    # training process). For large image files, where decoding holds the GIL;
    # the batches are the same for every count, and a run may resume with another.
    config.data.worker_count = 0

    # --- Model (diffusion_jax.models.UNetConfig) ---------------------------------
    # The output channels are derived: C, or 2C with diffusion.variance="learned_range".
    config.model = ml_collections.ConfigDict()
    # Base channels (a multiple of 32); level i has ch * ch_mult[i].
    config.model.ch = 128
    # One entry per resolution; len(ch_mult) - 1 downsamplings.
    config.model.ch_mult = (1, 2, 2, 2)
    # Residual blocks per resolution on the way down (one more on the way up).
    config.model.num_res_blocks = 2
    # Feature-map sizes (pixels) with self-attention after each residual block.
    config.model.attn_resolutions = (16,)
    # Dropout inside residual blocks.
    config.model.dropout = 0.1
    # Attention heads; or set num_head_channels for heads of that width (ADM).
    config.model.num_heads = 1
    config.model.num_head_channels = config_dict.placeholder(int)
    # ADM adaptive group norm (scale and shift from the timestep embedding).
    config.model.scale_shift_norm = False
    # ADM residual blocks for down/upsampling.
    config.model.resblock_updown = False
    # Number of classes for a class-conditional model (None: unconditional);
    # must match the dataset's. Label num_classes is the null class.
    config.model.num_classes = config_dict.placeholder(int)
    # How attention is computed: None (two batched matmuls, XLA), "xla" or
    # "cudnn" (jax.nn.dot_product_attention; "cudnn" is a fused GPU kernel and
    # needs compute_dtype="bfloat16"). The same values either way.
    config.model.attention_impl = config_dict.placeholder(str)
    # The 3x3 kernels' gradient: "auto", "xla" or "taps" (speed only; see
    # diffusion_jax.models.UNetConfig.conv_weight_grad).
    config.model.conv_weight_grad = "auto"

    # --- Diffusion ----------------------------------------------------------------
    config.diffusion = ml_collections.ConfigDict()
    # T, the number of diffusion steps.
    config.diffusion.num_timesteps = 1000
    # "linear" (Ho et al.), "cosine" (Nichol & Dhariwal), "sigmoid" or "log_snr_linear".
    config.diffusion.schedule = "linear"
    # Keyword arguments of the named schedule, e.g. beta_start/beta_end for
    # "linear" (defaults 1e-4, 0.02 at T=1000), s for "cosine"; on the command
    # line --config.diffusion.schedule_kwargs.beta_end=0.03.
    config.diffusion.schedule_kwargs = ml_collections.ConfigDict()
    # Learn the noise schedule (dj.LearnedSchedule, Kingma et al. 2021) jointly
    # with the model, instead of `schedule`. Needs loss="vlb" and
    # optim.weight_decay=0. Its parameters are averaged like the model's
    # (ema_decay); evaluation and sampling use both averages.
    config.diffusion.learned_schedule = False
    # What the model predicts: "eps", "x0" or "v".
    config.diffusion.prediction = "eps"
    # Reverse-process variance: "fixed_small" (posterior tilde-beta),
    # "fixed_large" (beta), or "learned_range" (Nichol & Dhariwal 2021 eq. 15).
    config.diffusion.variance = "fixed_large"
    # "simple" (Ho et al. eq. 14), "vlb", or "hybrid" (simple + vlb_weight * vlb).
    config.diffusion.loss = "simple"
    # Min-SNR-gamma weighting of the simple loss (Hang et al. 2023); None: off.
    config.diffusion.min_snr_gamma = config_dict.placeholder(float)
    # lambda of the hybrid loss.
    config.diffusion.vlb_weight = 0.001
    # "uniform", or "importance" sampling of t from the loss history
    # (Nichol & Dhariwal 2021 sec. 3.3; for loss="vlb").
    config.diffusion.timestep_sampler = "uniform"

    # --- Optimizer (diffusion_jax.training.state.OptimConfig) ---------------------
    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 2e-4
    # Linear warmup from 0 over this many updates.
    config.optim.warmup_steps = 5000
    # Clip gradients to this global norm; 0 disables.
    config.optim.grad_clip = 1.0
    # Decoupled weight decay (AdamW); 0 is Adam.
    config.optim.weight_decay = 0.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    # After warmup: "constant", or "cosine" decay to 0 at num_train_steps.
    config.optim.decay = "constant"

    # --- Sampling (periodic grids, the end of training, and --mode=sample) --------
    config.sample = ml_collections.ConfigDict()
    # "ddpm" (ancestral), "ddim" or "dpm_solver++".
    config.sample.sampler = "ddpm"
    # Respace to this many steps (None: all T).
    config.sample.num_steps = config_dict.placeholder(int)
    # Which rows num_steps keeps: "time" (evenly in t), "log_snr" (evenly in
    # log-SNR, Lu et al. 2022), or None: the sampler's default (log_snr for
    # dpm_solver++, time otherwise; time with a learned schedule, whose rows
    # cannot be chosen inside the compiled sampler).
    config.sample.spacing = config_dict.placeholder(str)
    # DDIM stochasticity in [0, 1].
    config.sample.eta = 0.0
    # Images per grid (0: no grids during training); drawn in a multiple of
    # the device count and trimmed.
    config.sample.num_images = 64
    # Classifier-free guidance weight w (Ho & Salimans 2022 eq. 6); needs
    # model.num_classes and cond_drop_rate > 0 (which trains the null class).
    # Samples cycle through the classes.
    config.sample.guidance_scale = 0.0
    # Clip the predicted x_0 to [-1, 1] at every step.
    config.sample.clip_denoised = True

    # --- Evaluation: the variational bound in bits/dim (Ho et al. eq. 5) ---------
    config.eval = ml_collections.ConfigDict()
    # Global eval batch size, rounded up to a multiple of the device count
    # (the padding examples are masked out of the mean).
    config.eval.batch_size = 128
    # Test batches per periodic evaluation during training (0: no NLL then).
    config.eval.num_batches_during_training = 1
    # At the end of training, the NLL over the whole test split to nll.json.
    config.eval.nll_at_end = False
    # Clip the predicted x_0 inside the bound's terms (as the original code).
    config.eval.clip_denoised = True

    # --- Checkpoints (diffusion_jax.checkpointing.Checkpointer) ------------------
    config.checkpoint = ml_collections.ConfigDict()
    # Keep the newest N checkpoints.
    config.checkpoint.max_to_keep = 3
    # Write checkpoints in a background thread.
    config.checkpoint.async_save = True

    return config
