"""The config schema: every key's default beside the values it accepts.

Every config starts from `base_config()` and changes what it needs, so all
configs have the same keys and command-line overrides work on any of them.
`validate(config)` checks each key against the rule written next to its
default, then the rules that join keys; the entry points run it once, when
the config is loaded (`config_loading`, the trainer, `saved_run.load_for_inference`).
A bad value fails there, before any data is read or anything compiled, in
one line naming the key. What depends on the machine or the data (the mesh
against the devices, `data.num_classes` against the data set) is checked
where those are known.
"""

import dataclasses
import difflib
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections
from ml_collections import config_dict

from coe_jax.errors import CoEError, require

# The values of the choice keys. The modules that implement the choices import
# these names, so the schema and the code cannot drift apart.
ACTIVATIONS = ("relu", "hard_swish", "swish", "pwlu")
EXPERT_LOOPS = ("auto", "unroll", "scan", "vmap")
REMAT_MODES = ("none", "block", "full")
COMPUTE_DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("rmsprop", "sgd", "adamw")
NONFINITE_POLICIES = ("stop", "skip")
BATCH_NORM_SCOPES = ("global", "replica")
STAGES = ("warmup", "coadapt", "delegator")  # Training stages, in the order they run.
LGM_RULES = ("argmax", "balanced", "soft")
RANDOM_RULE = "random"  # No LGM (ablations): not one of LGM_RULES, which score the experts.
ROUTING_MODES = ("exact", "serving")
# How tau is calibrated on the hold-out without a FLOPs target: the most
# accurate tau, or the cheapest within `eval.within_points` of the most accurate.
THRESHOLD_RULES = ("max_accuracy", "within")
# How a training step sends images to the experts (docs/method.md, section 4).
EXPERT_DISPATCHES = ("all", "routed")
AUGMENTATIONS = ("auto", "translate", "inception_crop", "pad_crop_flip")
SCHEDULES = ("per_stage", "continuous")


@dataclasses.dataclass(frozen=True)
class Rule:
  """The values one config key accepts, and the words of its one-line error."""
  accepts: Callable[[Any], bool]
  # "expected ...", after "key=value: " in the error; a function of no
  # arguments when the accepted values can change (the registered network kinds).
  expected: str | Callable[[], str]

  def check(self, key: str, value: Any) -> None:
    if not self.accepts(value):
      require(False, key, value, self.expected() if callable(self.expected) else self.expected)


@dataclasses.dataclass(frozen=True)
class Key:
  """A config key: its default and its rule. `placeholder` types a None default."""
  default: Any
  rule: Rule
  placeholder: Optional[type] = None


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_of(choices: Sequence[str], note: str = "") -> Rule:
  return Rule(lambda v: v in choices, f"expected one of {', '.join(choices)}{note}")


def real(accepts: Callable[[float], bool], expected: str) -> Rule:
  """A finite number that `accepts` takes."""
  return Rule(lambda v: _is_real(v) and accepts(v), expected)


def optional(rule: Rule, expected: str) -> Rule:
  """None, or a value `rule` accepts."""
  return Rule(lambda v: v is None or rule.accepts(v), expected)


POSITIVE_INT = Rule(lambda v: _is_int(v) and v >= 1, "expected a positive integer")
NON_NEGATIVE_INT = Rule(lambda v: _is_int(v) and v >= 0, "expected a non-negative integer")
ODD_KERNEL = Rule(lambda v: _is_int(v) and v >= 1 and v % 2 == 1, "expected an odd kernel size")
POSITIVE = real(lambda v: v > 0, "expected a positive number")
FLAG = Rule(lambda v: isinstance(v, bool), "expected True or False")
TEXT = Rule(lambda v: isinstance(v, str), "expected a string")
UNIT_INTERVAL_OPEN = real(lambda v: 0 <= v < 1, "expected a value in [0, 1)")
COEFFICIENT = real(lambda v: v >= 0, "expected a finite, non-negative coefficient")
STAGE_FRACTION = real(lambda v: v >= 0, "expected a non-negative fraction of train.num_steps")
LEARNING_RATE = real(lambda v: v > 0, "expected a positive learning rate")
WARMUP_STEPS = Rule(lambda v: _is_int(v) and v >= 0, "expected a non-negative number of steps")

# Each section: key -> Key(default, rule). Comments say what the key means.
_SCHEMA: dict[str, Any] = dict(
    seed=Key(0, Rule(_is_int, "expected an integer")),
    num_experts=Key(4, POSITIVE_INT),
    # How each device runs its stacked experts, in training and inference:
    # unroll (one copy of the network per expert in the program: fastest on
    # CPUs), scan (one copy, run once per expert: the program does not grow
    # with num_experts), vmap (one batched network), auto (unroll on CPUs,
    # scan on accelerators).
    expert_loop=Key("auto", one_of(EXPERT_LOOPS)),
    data=dict(
        # digits | image_folder | any TFDS name (imagenet2012, ...); an unknown
        # name fails when the data is opened.
        name=Key(
            "digits",
            Rule(lambda v: isinstance(v, str) and bool(v),
                 "expected digits, image_folder or a TFDS name")),
        path=Key("", TEXT),  # image_folder root (DIR/train/<class>/*, DIR/test/<class>/*)
        tfds_data_dir=Key("", TEXT),  # TFDS data dir; empty = TFDS default / $TFDS_DATA_DIR
        # Training and evaluation resolution (square).
        image_size=Key(32, Rule(lambda v: _is_int(v) and v > 0,
                                "expected a positive size in pixels")),
        channels=Key(3, Rule(lambda v: v in (1, 3), "expected 1 (grey) or 3 (RGB)")),
        # Classes of the data set; the trainer takes the number from the data and
        # checks it against this when set. The FLOPs tool reads it.
        num_classes=Key(
            None,
            Rule(lambda v: v is None or (_is_int(v) and v >= 2),
                 "expected None (from the data) or at least 2 classes"), int),
        # Training augmentation (coe_jax/data/common.py): auto = translate in
        # memory, inception_crop on TFDS. Each source checks it supports the choice.
        augment=Key("auto", one_of(AUGMENTATIONS)),
        # Share of train held out (never trained on) to calibrate tau; 0 = none.
        # Above half, calibration costs more training data than it is worth and
        # a small class could lose all its training examples.
        holdout_fraction=Key(
            0.1,
            real(lambda v: 0 <= v <= 0.5,
                 "expected a share of the training split in [0, 0.5] (0 = no hold-out)")),
        shuffle_buffer=Key(10_000, POSITIVE_INT),
        cache=Key(True, FLAG),
    ),
    train=dict(
        batch_size=Key(128, POSITIVE_INT),  # global batch, split over the mesh's data axis
        num_steps=Key(1000, POSITIVE_INT),
        # Stage lengths as fractions of num_steps, run in this order: warmup
        # (plain classifiers), coadapt (WGM + LGM + VCM), delegator (frozen
        # experts). They sum to 1; a stage left out has length 0.
        stages=dict(warmup=Key(0.2, STAGE_FRACTION),
                    coadapt=Key(0.8, STAGE_FRACTION),
                    delegator=Key(0.0, STAGE_FRACTION)),
        optimizer=Key("rmsprop", one_of(OPTIMIZERS)),
        # per_stage: each stage has its own schedule over its own steps, a linear
        # warm-up to its peak then cosine decay to 0 at the stage's end.
        # continuous: one warm-up and one cosine over the whole run, as a single
        # network trains; the stage_schedules stay unset (training/optim.py).
        schedule=Key("per_stage", one_of(SCHEDULES)),
        learning_rate=Key(0.016, LEARNING_RATE),  # peak of every stage that sets none
        warmup_steps=Key(100, WARMUP_STEPS),  # of every stage that sets none; at most half a stage
        stage_schedules={
            stage:
                dict(
                    learning_rate=Key(None, optional(LEARNING_RATE, LEARNING_RATE.expected),
                                      float),  # None = train.learning_rate
                    warmup_steps=Key(None, optional(WARMUP_STEPS, WARMUP_STEPS.expected),
                                     int))  # None = train.warmup_steps
            for stage in STAGES
        },
        weight_decay=Key(1e-5, real(lambda v: v >= 0, "expected a non-negative weight decay")),
        momentum=Key(0.9, UNIT_INTERVAL_OPEN),
        ema_decay=Key(0.0, UNIT_INTERVAL_OPEN),  # 0 disables the parameter EMA used for evaluation
        compute_dtype=Key("float32", one_of(COMPUTE_DTYPES)),
        # Activation memory: none (save every activation for the backward
        # pass), block (save each MBConv block's input, recompute inside),
        # full (save only each network's input).
        remat=Key("none", one_of(REMAT_MODES)),
        # Gradient accumulation: each step runs the batch in this many passes.
        # WGM, LGM and VCM still see the whole batch; BatchNorm sees each pass's.
        microbatches=Key(1, POSITIVE_INT),
        # BatchNorm's statistics on a mesh: global (the whole batch's, one
        # all-reduce per layer) | replica (each device's own samples', as
        # MobileNet/EfficientNet TPU recipes do; the running averages agree).
        batch_norm_scope=Key("global", one_of(BATCH_NORM_SCOPES)),
        # all: every expert trains on every image, weighted by WGM (N experts' cost
        # an image); routed: each expert trains on its WGM portion only (about
        # one expert's cost an image; wgm.off_portion_samples, lgm.score_fraction).
        expert_dispatch=Key("all", one_of(EXPERT_DISPATCHES)),
        # Warm-up trains expert 0 alone, as one generalist; when co-adaptation
        # starts, every expert becomes a copy of it (weights, BatchNorm
        # statistics, optimizer state, EMA) and WGM's portions make them differ.
        generalist_warmup=Key(False, FLAG),
        # A run's workdir whose newest checkpoint gives this run's starting
        # networks (parameters and BatchNorm statistics, not the optimizer):
        # "" = random initialisation. A one-expert run's expert is copied into
        # all N experts (a generalist); leaves whose shapes differ are refused.
        init_from=Key("", TEXT),
        # PWLU phase I -> II at this fraction of training.
        pwlu_realign_fraction=Key(0.05, real(lambda v: 0 <= v < 1,
                                             "expected a fraction in [0, 1)")),
        checkpoint_every_steps=Key(500, POSITIVE_INT),
        # Also save when this many seconds have passed since the last save,
        # checked at logging steps: preemptible pods lose at most that much. 0 = off.
        checkpoint_every_secs=Key(
            0.0, real(lambda v: v >= 0, "expected a non-negative number of seconds")),
        # Compiled programs kept across restarts, so a resumed run does not
        # recompile: None = JAX_COMPILATION_CACHE_DIR if set, else
        # WORKDIR/compilation_cache; "" = off.
        compilation_cache_dir=Key(None, optional(TEXT, "expected None or a directory"), str),
        keep_checkpoints=Key(3, Rule(lambda v: _is_int(v) and v >= 1, "expected at least 1")),
        log_every_steps=Key(50, POSITIVE_INT),
        eval_every_steps=Key(0, NON_NEGATIVE_INT),  # 0 = evaluate at the end only
        # What a non-finite loss or gradient does.
        nonfinite=Key("stop", one_of(NONFINITE_POLICIES)),
        # >0: profile this many steps early in training (clu Profile).
        profile_steps=Key(0, NON_NEGATIVE_INT),
        # FLOP/s of one device for the logged model-FLOPs utilisation (mfu):
        # None = the table in coe_jax/flops.py for known TPUs and GPUs.
        peak_flops_per_device=Key(None, optional(POSITIVE, "expected None or a positive FLOP/s"),
                                  float),
    ),
    wgm=dict(
        # alpha: an expert's loss weight outside its portion.
        off_portion_weight=Key(0.2, real(lambda v: 0 <= v <= 1, "expected a weight in [0, 1]")),
        # Routed dispatch: images an expert trains on from outside its portion
        # each step, drawn uniformly and weighted so that the expected loss is
        # alpha's (0 = its portion only, which needs alpha = 0).
        off_portion_samples=Key(0, NON_NEGATIVE_INT),
        # Routing groups: the batch splits into this many groups, each
        # partitioned on its own (B / groups / num_experts images an expert).
        # Routed dispatch on a mesh needs a multiple of the data axis; -1 is
        # one group per data shard (1 on one device), resolved with the mesh
        # (`mesh.with_routing_groups`), so one config routes on any mesh.
        groups=Key(
            1,
            Rule(lambda v: _is_int(v) and (v == -1 or v >= 1),
                 "expected -1 (one per data shard) or a positive integer")),
        sinkhorn_epsilon=Key(0.05, POSITIVE),
        sinkhorn_max_iterations=Key(200, POSITIVE_INT),
        sinkhorn_threshold=Key(1e-3, POSITIVE),
    ),
    lgm=dict(
        rule=Key(
            "balanced",
            Rule(
                lambda v: v in LGM_RULES or v == RANDOM_RULE,
                f"expected one of {', '.join(LGM_RULES)} "
                f"(or {RANDOM_RULE}: LGM off, for ablations)")),
        temperature=Key(1.0, POSITIVE),
        # Routed dispatch: the share of each batch every expert scores (forward
        # only) for LGM's and VCM's targets; 1 = every image, 1 / num_experts
        # keeps the step's cost flat in num_experts. 1 / fraction must be a
        # whole number.
        score_fraction=Key(
            1.0,
            real(lambda v: 0 < v <= 1 and abs(1 / v - round(1 / v)) < 1e-6,
                 "expected 1 / k for a whole number k >= 1 (1, 0.5, 0.25, ...)")),
    ),
    vcm=dict(enabled=Key(True, FLAG)),
    loss=dict(
        selection_weight=Key(1.0, COEFFICIENT),  # lambda_sel
        delegator_weight=Key(1.0, COEFFICIENT),  # lambda_D
        # The delegator's class loss only (the experts' has none). Smoothing caps
        # the delegator's confidence near 1 - label_smoothing (K-1)/K, where
        # early exit decides: 0 lets the confidence reach a useful tau.
        label_smoothing=Key(0.1, UNIT_INTERVAL_OPEN),
        # The selection head learns LGM's labels in warm-up too, so WGM's first
        # portions do not come from a random head. Needs experts that differ
        # (not train.generalist_warmup).
        selection_in_warmup=Key(False, FLAG),
        distill_weight=Key(0.0, COEFFICIENT),  # delegator distillation towards the selected expert
        distill_temperature=Key(1.0, POSITIVE),
    ),
    eval=dict(
        # tau; None = calibrate on the hold-out.
        threshold=Key(
            None,
            Rule(lambda v: v is None or (_is_real(v) and 0 <= v <= 1) or v == math.inf,
                 "expected None (calibrate), a value in [0, 1], or inf (never exit early)"), float),
        # Calibrate tau to this mean budget of multiply-adds per image.
        target_mean_flops=Key(
            None, optional(POSITIVE, "expected None or a positive number of multiply-adds"), float),
        # Without a target: max_accuracy | within (THRESHOLD_RULES). The hold-out's
        # accuracy is a noisy estimate; "within" takes the cheaper tau that it
        # cannot tell apart from the best (issue 33; our reading of the paper's
        # accuracy-FLOPs trade-off).
        threshold_rule=Key("max_accuracy", one_of(THRESHOLD_RULES)),
        within_points=Key(0.1, real(lambda v: v >= 0, "expected top-1 points >= 0")),
        batch_size=Key(256, POSITIVE_INT),
    ),
    routing=dict(
        # exact (P = Q) | serving (P from capacity_factor)
        mode=Key("exact", one_of(ROUTING_MODES)),
        capacity_factor=Key(1.25, POSITIVE),  # serving mode's slack over a balanced load
    ),
    mesh=dict(
        data=Key(
            -1,
            Rule(lambda v: _is_int(v) and (v == -1 or v >= 1),
                 "expected -1 (all remaining devices) or a positive integer")),
        expert=Key(1, POSITIVE_INT),
    ),
)

# The built-in network kind: MBConv networks, whose stages may be Fused-MBConv
# (coe_jax.models.kinds says why one kind).
MBCONV = "mbconv"
# Each network kind's entry keys, `kind` first. `coe_jax.models.kinds.register_kind`
# adds a kind here together with its implementation.
_NETWORK_KINDS: dict[str, dict[str, Key]] = {}
_KIND = Key(
    MBCONV,
    Rule(
        lambda v: isinstance(v, str) and v in _NETWORK_KINDS,
        lambda: f"expected a registered network kind, one of {', '.join(_NETWORK_KINDS)} "
        "(coe_jax.models.kinds.register_kind adds one)"))

# The networks (`delegator`, `expert`): `network(...)` sets them in each config.
# These are the keys of an MBConv network; another kind has its own (`network_of`).
_NETWORK: dict[str, Key] = dict(
    kind=_KIND,  # the architecture: a registered network kind
    stem_features=Key(16, POSITIVE_INT),  # channels of the stem's convolution
    stem_kernel=Key(3, ODD_KERNEL),
    stem_stride=Key(2, POSITIVE_INT),
    stages=Key((),
               Rule(lambda v: isinstance(v, (list, tuple)) and len(v) >= 1,
                    "expected a list of at least one stage")),  # `stage(...)` entries
    head_features=Key(1280, POSITIVE_INT),  # channels of the 1x1 convolution before pooling
    # Width of the hidden dense layer after pooling (as in MobileNetV3); 0 for none.
    classifier_features=Key(
        0, Rule(lambda v: _is_int(v) and v >= 0, "expected 0 (none) or a positive width")),
    activation=Key("hard_swish", one_of(ACTIVATIONS)),
    width_multiplier=Key(1.0, POSITIVE),
    depth_multiplier=Key(1.0, POSITIVE),
    dropout_rate=Key(0.0, real(lambda v: 0 <= v < 1, "expected a rate in [0, 1)")),
    # CondConv kernels per convolution, from stage `condconv_from_stage` on; 0 = off.
    condconv_kernels=Key(
        0, Rule(lambda v: _is_int(v) and v >= 0,
                "expected 0 (off) or a positive number of kernels")),
    condconv_from_stage=Key(0, NON_NEGATIVE_INT),
    pwlu_intervals=Key(16, POSITIVE_INT),
    pwlu_per_channel=Key(False, FLAG),
)
_NETWORK_KINDS[MBCONV] = _NETWORK

# One entry of a network's `stages`: `stage(...)` builds one.
_STAGE: dict[str, Rule] = dict(
    features=POSITIVE_INT,
    depth=POSITIVE_INT,
    kernel=ODD_KERNEL,
    expansion=real(lambda v: v >= 1, "expected an expansion ratio >= 1"),
    stride=POSITIVE_INT,
    se_ratio=real(lambda v: 0 <= v <= 1, "expected a ratio in [0, 1]"),
    # "" = the network's activation.
    activation=Rule(lambda v: v == "" or v in ACTIVATIONS,
                    f"expected one of {', '.join(ACTIVATIONS)} ('' = the network's)"),
    fused=FLAG,
)
# The stage keys a hand-written stage may leave out.
_STAGE_OPTIONAL = ("activation", "fused")
NETWORKS = ("delegator", "expert")


def _defaults(schema: Mapping[str, Any]) -> ml_collections.ConfigDict:
  values = {}
  for name, entry in schema.items():
    if isinstance(entry, Key):
      values[name] = (config_dict.placeholder(entry.placeholder)
                      if entry.placeholder else entry.default)
    else:
      values[name] = _defaults(entry)
  return ml_collections.ConfigDict(values)


def base_config() -> ml_collections.ConfigDict:
  """All keys with defaults; `delegator` and `expert` are set by each config."""
  return _defaults(_SCHEMA)


def stage(features: int,
          depth: int,
          kernel: int,
          expansion: float,
          stride: int,
          se_ratio: float = 0.25,
          activation: str = "",
          fused: bool = False) -> dict[str, Any]:
  """One MBConv stage: `depth` blocks, the first with `stride`.

  An empty `activation` means the network's default activation. `fused`
  blocks (EfficientNetV2's Fused-MBConv) replace the 1x1 expansion and the
  depthwise k x k convolution by one dense k x k convolution.
  """
  return dict(features=features,
              depth=depth,
              kernel=kernel,
              expansion=expansion,
              stride=stride,
              se_ratio=se_ratio,
              activation=activation,
              fused=fused)


def network(stem_features: int, stages: Sequence[dict[str, Any]], head_features: int,
            **settings: Any) -> ml_collections.ConfigDict:
  """An MBConv network: stem, stages, 1x1 head conv, pooling, classifier.

  `settings` overrides the other keys' defaults (`_NETWORK`, which says what
  each means), e.g. `activation="relu"`, `stem_stride=1`, `condconv_kernels=4`.
  """
  unknown = sorted(set(settings) - set(_NETWORK))
  if unknown:
    raise CoEError(f"network({unknown[0]}=...): no such network key; expected some of "
                   f"{', '.join(_NETWORK)}")
  values = {name: key.default for name, key in _NETWORK.items()}
  values.update(settings,
                stem_features=stem_features,
                stages=tuple(stages),
                head_features=head_features)
  return ml_collections.ConfigDict(values)


def network_of(kind: str, **settings: Any) -> ml_collections.ConfigDict:
  """A network entry of a registered `kind`: its keys' defaults, `settings` over them.

  For the kinds registered by `coe_jax.models.kinds.register_kind`; `network`
  builds MBConv networks. Checked as a whole by `validate_network`.
  """
  _KIND.rule.check("kind", kind)
  keys = _NETWORK_KINDS[kind]
  unknown = sorted(set(settings) - set(keys))
  if unknown:
    raise CoEError(f"network_of({kind!r}, {unknown[0]}=...): no such key of a {kind} network; "
                   f"expected some of {', '.join(keys)}")
  values = {name: key.default for name, key in keys.items()}
  values.update(settings, kind=kind)
  return ml_collections.ConfigDict(values)


def network_kinds() -> tuple[str, ...]:
  """The registered network kinds: the values `delegator.kind` and `expert.kind` accept."""
  return tuple(_NETWORK_KINDS)


def add_network_kind(name: str, keys: Mapping[str, Key]) -> None:
  """Adds network kind `name`, whose entries have `keys` besides `kind`, to the schema.

  `coe_jax.models.kinds.register_kind` calls it with the kind's implementation;
  use that one.
  """
  require(
      isinstance(name, str) and name.isidentifier() and name not in _NETWORK_KINDS, "kind", name,
      f"expected a new kind name (an identifier); registered: {', '.join(_NETWORK_KINDS)}")
  for key, entry in keys.items():
    require(key != "kind" and isinstance(entry, Key), f"{name}.{key}", entry,
            "expected a config_base.Key (default and rule) for each key but `kind`")
  _NETWORK_KINDS[name] = {"kind": _KIND, **keys}


def remove_network_kind(name: str) -> None:
  """Removes a kind `add_network_kind` added; the built-in `mbconv` stays."""
  require(name in _NETWORK_KINDS and name != MBCONV, "kind", name,
          "expected a network kind added by register_kind")
  del _NETWORK_KINDS[name]


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every key of `config` and the rules that join keys.

  The networks are checked when present; `base_config()` has none, and the
  model refuses a config without them.

  Raises:
    CoEError: one line naming the first bad, unknown or missing key and its value.
  """
  extra = {name: config[name] for name in NETWORKS if name in config}
  _check_section(config, _SCHEMA, "", extra=tuple(extra))
  for name, net in extra.items():
    validate_network(net, name)
  stages = dict(config.train.stages.items())
  total = sum(stages.values())
  require(
      abs(total - 1) <= 1e-6, "train.stages", stages,
      f"expected fractions that sum to 1 (they sum to {total:g})")
  if config.train.schedule == "continuous":
    for name in STAGES:
      own = config.train.stage_schedules[name]
      for key in ("learning_rate", "warmup_steps"):
        require(own[key] is None, f"train.stage_schedules.{name}.{key}", own[key],
                "expected None under train.schedule=continuous (one schedule for the whole run)")
  warmup = stages.get("warmup", 0.0) > 0
  if config.train.generalist_warmup:
    require(warmup and stages.get("coadapt", 0.0) > 0, "train.generalist_warmup", True,
            "needs a warmup and a coadapt stage (train.stages)")
    require(not config.loss.selection_in_warmup, "loss.selection_in_warmup", True,
            "the generalist warm-up trains expert 0 alone, so there is no choice to learn yet")
  _validate_dispatch(config)
  require(
      config.eval.threshold is not None or config.data.holdout_fraction > 0,
      "data.holdout_fraction", config.data.holdout_fraction,
      "tau is calibrated on a hold-out of the training split, never on the test split: "
      "hold some out, or fix tau with eval.threshold")
  require(config.eval.target_mean_flops is None or config.eval.threshold_rule == "max_accuracy",
          "eval.threshold_rule", config.eval.threshold_rule,
          "eval.target_mean_flops chooses tau by its budget: leave the rule at max_accuracy")


def _validate_dispatch(config: ml_collections.ConfigDict) -> None:
  """The rules joining the batch, the experts, WGM's groups and routed dispatch."""
  batch, num_experts, groups = config.train.batch_size, config.num_experts, config.wgm.groups
  drawn = config.wgm.off_portion_samples
  stride = round(1 / config.lgm.score_fraction)
  if config.train.expert_dispatch == "routed":
    require(batch % stride == 0, "lgm.score_fraction", config.lgm.score_fraction,
            f"expected 1 / k for a k that divides train.batch_size={batch}")
    require(stride == 1 or config.loss.distill_weight == 0, "loss.distill_weight",
            config.loss.distill_weight, "distillation needs every image's selected expert: "
            "lgm.score_fraction=1 with it")
  if groups == -1:  # Checked below once the mesh gives the number (`mesh.with_routing_groups`).
    return
  require(batch % groups == 0, "wgm.groups", groups,
          f"expected a divisor of train.batch_size={batch}")
  if config.train.expert_dispatch != "routed":
    return
  require((batch // groups) % num_experts == 0, "train.batch_size", batch,
          f"routed dispatch gives each of the {num_experts} experts an equal share of each of the "
          f"{groups} routing groups: expected a multiple of {groups * num_experts}")
  require(
      drawn > 0 or config.wgm.off_portion_weight == 0, "wgm.off_portion_weight",
      config.wgm.off_portion_weight, "routed dispatch trains each expert on its portion only: "
      "set wgm.off_portion_samples > 0 to draw images from outside it, or this weight to 0")
  per_group = batch // groups
  require(
      drawn % groups == 0 and drawn // groups <= per_group - per_group // num_experts,
      "wgm.off_portion_samples", drawn, f"expected a multiple of wgm.groups={groups}, at most "
      f"{groups * (per_group - per_group // num_experts)} (the images outside a portion)")


def validate_network(net: Mapping[str, Any], name: str) -> None:
  """Checks a network entry (`delegator`, `expert`): its kind, the kind's keys and,
  in an MBConv network, each stage."""
  require("kind" in net, f"{name}.kind", None, "missing from the config")
  _KIND.rule.check(f"{name}.kind", net["kind"])
  _check_section(net, _NETWORK_KINDS[net["kind"]], f"{name}.")
  if net["kind"] != MBCONV:
    return
  required = [field for field in _STAGE if field not in _STAGE_OPTIONAL]
  for index, entry in enumerate(net["stages"]):
    key = f"{name}.stages[{index}]"
    require(
        isinstance(entry, Mapping) and all(field in entry for field in required), key, entry,
        f"expected a stage with {', '.join(required)} (coe_jax.config_base.stage builds one)")
    for field, value in entry.items():
      require(field in _STAGE, f"{key}.{field}", value,
              f"no such stage key; expected some of {', '.join(_STAGE)}")
      _STAGE[field].check(f"{key}.{field}", value)


def check(config: ml_collections.ConfigDict, *keys: str) -> None:
  """Checks the dotted `keys` of `config` against their rules.

  For the components that take a config directly (the model builds from a
  config a user may have written by hand): the same rule, the same error.
  """
  for key in keys:
    value = config
    for part in key.split("."):
      value = value[part]
    check_value(key, value)


def check_value(key: str, value: Any) -> None:
  """Checks `value` against the rule of the dotted config `key`.

  For the functions whose arguments carry a config value (`RoutingSpec`,
  `CoE.run_stacked`'s loop, LGM's rule).
  """
  entry: Any = _SCHEMA
  for part in key.split("."):
    entry = entry[part]
  entry.rule.check(key, value)


def _check_section(section: Mapping[str, Any],
                   schema: Mapping[str, Any],
                   prefix: str,
                   extra: Sequence[str] = ()) -> None:
  """Checks `section` against `schema`: no unknown key, no missing one, each value."""
  for name in section.keys():
    if name in extra:
      continue
    require(name in schema, f"{prefix}{name}", section[name], _unknown(name, schema, prefix))
  for name, entry in schema.items():
    key = f"{prefix}{name}"
    if name not in section:
      # A stage left out of train.stages has length 0; any other key is needed.
      require(prefix == "train.stages.", key, None, "missing from the config")
      continue
    if isinstance(entry, Key):
      entry.rule.check(key, section[name])
    else:
      require(
          isinstance(section[name], Mapping) or hasattr(section[name], "keys"), key, section[name],
          "expected a section of keys")
      _check_section(section[name], entry, f"{key}.")


def _unknown(name: str, schema: Mapping[str, Any], prefix: str) -> str:
  where = prefix.rstrip(".") or "the config"
  if len(schema) <= 6:
    return f"no such key in {where}; expected one of {', '.join(schema)}"
  close = difflib.get_close_matches(name, list(schema), n=1)
  return f"no such key in {where}" + (f" (did you mean {close[0]}?)" if close else "")


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
  """A run's saved config.json in today's layout: keys renamed since are moved,
  keys added since take their defaults.

  `routing.expert_loop` became the top-level `expert_loop` (it is read by
  training too, not only by the router). Every key added later has a default
  that trains as the run did before it existed (`train.schedule=per_stage`,
  `train.generalist_warmup=False`, `delegator.kind=mbconv`, ...).
  """
  saved = dict(saved)
  routing = dict(saved.get("routing", {}))
  if "expert_loop" in routing and "expert_loop" not in saved:
    saved["expert_loop"] = routing.pop("expert_loop")
    saved["routing"] = routing
  for name in NETWORKS:
    if isinstance(saved.get(name), Mapping):
      saved[name] = upgrade_network(saved[name])
  return _fill_defaults(saved, _SCHEMA, "")


def upgrade_network(saved: Mapping[str, Any]) -> dict[str, Any]:
  """A saved network entry in today's layout: its `kind` ("mbconv" for networks saved
  before kinds existed) and the kind's keys added since, at their defaults.

  For a run's config.json (`upgrade`) and the networks its checkpoints were
  saved with. An unregistered kind's entry stays as it is; `validate` names it.
  """
  kind = saved.get("kind", MBCONV)
  if not (isinstance(kind, str) and kind in _NETWORK_KINDS):
    return dict(saved)
  return _fill_defaults({**saved, "kind": kind}, _NETWORK_KINDS[kind], "")


def _fill_defaults(saved: dict[str, Any], schema: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """`saved` with the keys of `schema` it lacks set to their defaults (train.stages
  excepted: a stage left out has length 0)."""
  filled = dict(saved)
  for name, entry in schema.items():
    if prefix == "train.stages.":
      break
    if isinstance(entry, Key):
      if name not in filled:
        filled[name] = entry.default
    elif isinstance(filled.get(name, {}), Mapping):
      filled[name] = _fill_defaults(filled.get(name, {}), entry, f"{prefix}{name}.")
  return filled
