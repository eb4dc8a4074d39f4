"""The config schema: every key with its default, and builders for networks.

Every config starts from `base_config()` and changes what it needs, so all
configs have the same keys and command-line overrides work on any of them.
"""

from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict


def stage(features: int, depth: int, kernel: int, expansion: float, stride: int,
          se_ratio: float = 0.25, activation: str = "", fused: bool = False) -> dict[str, Any]:
  """One MBConv stage: `depth` blocks, the first with `stride`.

  An empty `activation` means the network's default activation. `fused`
  blocks (EfficientNetV2's Fused-MBConv) replace the 1x1 expansion and the
  depthwise k x k convolution by one dense k x k convolution.
  """
  return dict(features=features, depth=depth, kernel=kernel, expansion=expansion,
              stride=stride, se_ratio=se_ratio, activation=activation, fused=fused)


def network(stem_features: int, stages: Sequence[dict[str, Any]], head_features: int,
            classifier_features: int = 0, activation: str = "hard_swish",
            stem_stride: int = 2, condconv_kernels: int = 0,
            condconv_from_stage: int = 0) -> ml_collections.ConfigDict:
  """An MBConv network: stem, stages, 1x1 head conv, pooling, classifier.

  Args:
    stem_features: channels of the stem's 3x3 convolution.
    stages: `stage(...)` entries, applied in order.
    head_features: channels of the 1x1 convolution before global pooling.
    classifier_features: width of the hidden dense layer after pooling (as in
      MobileNetV3); 0 for none.
    activation: relu | hard_swish | swish | pwlu.
    stem_stride: stride of the stem convolution.
    condconv_kernels: CondConv kernels per convolution; 0 disables CondConv.
    condconv_from_stage: CondConv is used from this stage index on.
  """
  return ml_collections.ConfigDict(dict(
      stem_features=stem_features,
      stem_kernel=3,
      stem_stride=stem_stride,
      stages=tuple(stages),
      head_features=head_features,
      classifier_features=classifier_features,
      activation=activation,
      width_multiplier=1.0,
      depth_multiplier=1.0,
      dropout_rate=0.0,
      condconv_kernels=condconv_kernels,
      condconv_from_stage=condconv_from_stage,
      pwlu_intervals=16,
      pwlu_per_channel=False,
  ))


def base_config() -> ml_collections.ConfigDict:
  """All keys with defaults; `delegator` and `expert` are set by each config."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_experts = 4

  c.data = ml_collections.ConfigDict(dict(
      name="digits",        # digits | image_folder | any TFDS name (imagenet2012, ...)
      path="",              # image_folder root (DIR/train/<class>/*, DIR/test/<class>/*)
      tfds_data_dir="",     # TFDS data dir; empty = TFDS default / $TFDS_DATA_DIR
      image_size=32,        # training and evaluation resolution (square)
      channels=3,
      # Classes of the data set; the trainer takes the number from the data and
      # checks it against this when set. The FLOPs tool reads it.
      num_classes=config_dict.placeholder(int),
      # Training augmentation: auto | translate | inception_crop | pad_crop_flip
      # (coe_jax/data/common.py); auto = translate in memory, inception_crop on TFDS.
      augment="auto",
      holdout_fraction=0.1,  # share of train held out (never trained on) to calibrate tau; 0 = none
      shuffle_buffer=10_000,
      cache=True,
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=128,       # global batch, split over the mesh's data axis
      num_steps=1000,
      # Stage lengths as fractions of num_steps, run in this order:
      # warmup (plain classifiers), coadapt (WGM + LGM + VCM), delegator (frozen experts).
      stages=ml_collections.ConfigDict(dict(warmup=0.2, coadapt=0.8, delegator=0.0)),
      optimizer="rmsprop",  # rmsprop | sgd | adamw
      # Each stage has its own schedule over its own steps: linear warm-up to its
      # peak, then cosine decay to 0 at the stage's end (coe_jax/training/optim.py).
      learning_rate=0.016,  # peak learning rate of every stage that sets none
      warmup_steps=100,     # warm-up of every stage that sets none; at most half a stage
      stage_schedules=ml_collections.ConfigDict({
          stage: ml_collections.ConfigDict(dict(
              learning_rate=config_dict.placeholder(float),  # None = train.learning_rate
              warmup_steps=config_dict.placeholder(int)))    # None = train.warmup_steps
          for stage in ("warmup", "coadapt", "delegator")}),
      weight_decay=1e-5,
      momentum=0.9,
      ema_decay=0.0,        # 0 disables the parameter EMA used for evaluation
      compute_dtype="float32",  # float32 | bfloat16
      # Activation memory: none (save every activation for the backward pass),
      # block (save each MBConv block's input, recompute inside), full (save
      # only each network's input).
      remat="none",         # none | block | full
      # Gradient accumulation: each step runs the batch in this many passes.
      # WGM, LGM and VCM still see the whole batch; BatchNorm sees each pass's.
      microbatches=1,
      # BatchNorm's statistics on a mesh: global (the whole batch's, one
      # all-reduce per layer) | replica (each device's own samples', as
      # MobileNet/EfficientNet TPU recipes do; the running averages agree).
      batch_norm_scope="global",
      pwlu_realign_fraction=0.05,  # PWLU phase I -> II at this fraction of training
      checkpoint_every_steps=500,
      # Compiled programs kept across restarts, so a resumed run does not
      # recompile: None = JAX_COMPILATION_CACHE_DIR if set, else
      # WORKDIR/compilation_cache; "" = off.
      compilation_cache_dir=config_dict.placeholder(str),
      keep_checkpoints=3,
      log_every_steps=50,
      eval_every_steps=0,   # 0 = evaluate at the end only
      nonfinite="stop",     # stop | skip: what a non-finite loss or gradient does
      profile_steps=0,      # >0: profile this many steps early in training (clu Profile)
      # FLOP/s of one device for the logged model-FLOPs utilisation (mfu):
      # None = the table in coe_jax/flops.py for known TPUs and GPUs.
      peak_flops_per_device=config_dict.placeholder(float),
  ))

  c.wgm = ml_collections.ConfigDict(dict(
      off_portion_weight=0.2,  # alpha: an expert's loss weight outside its portion
      sinkhorn_epsilon=0.05,
      sinkhorn_max_iterations=200,
      sinkhorn_threshold=1e-3,
  ))
  # rule: argmax | balanced | soft, or random (LGM off, for ablations).
  c.lgm = ml_collections.ConfigDict(dict(rule="balanced", temperature=1.0))
  c.vcm = ml_collections.ConfigDict(dict(enabled=True))
  c.loss = ml_collections.ConfigDict(dict(
      selection_weight=1.0,  # lambda_sel
      delegator_weight=1.0,  # lambda_D
      label_smoothing=0.1,
      distill_weight=0.0,    # delegator distillation towards the selected expert
      distill_temperature=1.0,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      threshold=config_dict.placeholder(float),          # None = calibrate on held-out data
      target_mean_flops=config_dict.placeholder(float),  # calibrate tau to this budget
      batch_size=256,
  ))
  c.routing = ml_collections.ConfigDict(dict(
      mode="exact",          # exact (C = group size) | serving (C from capacity_factor)
      capacity_factor=1.25,
      # How each device runs its stacked experts, in training and inference:
      # unroll (one copy of the network per expert in the program: fastest on
      # CPUs), scan (one copy, run once per expert: the program does not grow
      # with num_experts), vmap (one batched network), auto (unroll on CPUs,
      # scan on accelerators).
      expert_loop="auto",  # auto | unroll | scan | vmap
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, expert=1))  # -1 = all remaining devices
  return c


def mobilenet_v3_large_stages(se_ratio: float = 0.25) -> list[dict[str, Any]]:
  """MobileNetV3-Large's stages (Howard et al. 2019), one expansion ratio per stage."""
  return [
      stage(16, 1, 3, 1, 1, se_ratio=0.0, activation="relu"),
      stage(24, 2, 3, 4, 2, se_ratio=0.0, activation="relu"),
      stage(40, 3, 5, 3, 2, se_ratio=se_ratio, activation="relu"),
      stage(80, 4, 3, 2.5, 2, se_ratio=0.0),
      stage(112, 2, 3, 6, 1, se_ratio=se_ratio),
      stage(160, 3, 5, 6, 2, se_ratio=se_ratio),
  ]


def small_delegator(width_multiplier: float) -> ml_collections.ConfigDict:
  """A MobileNetV3-Small-like delegator for 224 px inputs."""
  net = network(
      stem_features=16, head_features=576, classifier_features=1024,
      stages=[stage(16, 1, 3, 1, 2, activation="relu"),
              stage(24, 2, 3, 4, 2, se_ratio=0.0, activation="relu"),
              stage(40, 3, 5, 4, 2),
              stage(48, 2, 5, 3, 1),
              stage(96, 3, 5, 6, 2)])
  net.width_multiplier = width_multiplier
  return net


def imagenet_recipe(c: ml_collections.ConfigDict) -> None:
  """ImageNet data and an EfficientNet-style training recipe, at batch 4096."""
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.num_classes = 1000
  c.data.cache = False
  # A ~12.8k-image "minival" (1% of the training split) calibrates tau, so the
  # experts train on 99% of ImageNet, close to the paper's full training set.
  c.data.holdout_fraction = 0.01
  c.train.batch_size = 4096
  c.train.num_steps = 93_800           # 300 epochs of 1,281,167 images
  c.train.stages.warmup = 0.1
  c.train.stages.coadapt = 0.85
  c.train.stages.delegator = 0.05
  c.train.optimizer = "rmsprop"
  c.train.learning_rate = 0.016 * 4096 / 256
  c.train.warmup_steps = 1560          # 5 epochs, at the start of warmup and of coadapt
  # The delegator stage (frozen experts) fine-tunes at a tenth of the peak
  # with a short warm-up: our choice; the paper gives no schedule.
  c.train.stage_schedules.delegator.learning_rate = 0.1 * c.train.learning_rate
  c.train.stage_schedules.delegator.warmup_steps = 200
  c.train.weight_decay = 1e-5
  c.train.ema_decay = 0.9999
  c.train.compute_dtype = "bfloat16"
  c.train.checkpoint_every_steps = 2000
  c.train.log_every_steps = 100
  c.train.eval_every_steps = 10_000
  c.loss.label_smoothing = 0.1
  c.eval.batch_size = 1024
