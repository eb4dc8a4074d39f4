"""The delegator and expert networks: a network kind's body, then the heads.

`Backbone` is the body of the built-in kind, MBConv (`coe_jax.models.kinds`);
`Expert` and `Delegator` build the body of their spec's kind and add the heads.

Axis letters: B batch, H/W height and width (H'/W' after a strided layer),
C channels, F pooled features, K classes, N experts (docs/method.md, section 2).

Networks take images as the data pipelines deliver them, values 0-255 of any
dtype, [B, H, W, C], and normalise on the device: the host ships uint8, a
quarter of the bytes of float32, and exported models need no separate step.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from coe_jax.models import kinds
from coe_jax.models.conv import Conv
from coe_jax.models.mbconv import Activation, BatchNorm, MBConv
from coe_jax.models.spec import NetworkSpec


def normalize_images(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """Maps 0-255 pixel values to [-1, 1]."""
  return (images.astype(dtype) - 127.5) / 127.5


def example_dropout(module: nn.Module, rate: float, features: jax.Array, train: bool,
                    example_index: Optional[jax.Array]) -> jax.Array:
  """Dropout on pooled features [B, F] whose mask for example i depends on i alone.

  Row i's mask is drawn from the module's dropout key folded with
  `example_index[i]`, the example's position in the global batch (0..B-1
  when None), so the masks of a step are the same however the batch is split
  over devices or micro-batches: a run trains alike on every mesh.
  """
  if not train or rate == 0:
    return features
  key = module.make_rng("dropout")
  if example_index is None:
    example_index = jnp.arange(features.shape[0])
  keep = jax.vmap(
      lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), 1 - rate, features.shape[1:]))(
          example_index)  # [B, F]
  return jnp.where(keep, features / (1 - rate), 0).astype(features.dtype)


def _rematerialised(module: type[nn.Module], wanted: bool) -> type[nn.Module]:
  """`module`, recomputed in the backward pass instead of saving its activations, if wanted.

  Its `__call__(x, train)` is traced with `train` static.
  """
  return nn.remat(module, static_argnums=(2,)) if wanted else module


class Backbone(nn.Module):
  """Stem, MBConv stages, 1x1 head convolution, global pooling, classifier: the
  "mbconv" kind's body."""
  spec: NetworkSpec
  dtype: Any = jnp.float32
  batch_norm_axis: Optional[str] = None  # Mesh axis BatchNorm reduces over (in shard_map).
  remat: str = "none"  # config_base.REMAT_MODES: "block" saves each MBConv block's input alone.

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    spec = self.spec
    act = lambda name: Activation(spec.activation,
                                  spec.pwlu_intervals,
                                  spec.pwlu_per_channel,
                                  self.batch_norm_axis,
                                  name=name)
    norm = functools.partial(BatchNorm,
                             use_running_average=not train,
                             dtype=self.dtype,
                             axis_name=self.batch_norm_axis)
    x = normalize_images(images, self.dtype)  # [B, H, W, C]
    x = Conv(spec.stem_features,
             spec.stem_kernel,
             strides=spec.stem_stride,
             dtype=self.dtype,
             name="stem")(x)
    x = act("stem_act")(norm(name="stem_bn")(x), train)
    block = _rematerialised(MBConv, self.remat == "block")
    for s, stage in enumerate(spec.stages):
      for b in range(stage.depth):
        x = block(features=stage.features,
                  kernel_size=stage.kernel,
                  strides=stage.stride if b == 0 else 1,
                  expansion=stage.expansion,
                  se_ratio=stage.se_ratio,
                  activation=stage.activation,
                  condconv_kernels=stage.condconv_kernels,
                  fused=stage.fused,
                  pwlu_intervals=spec.pwlu_intervals,
                  pwlu_per_channel=spec.pwlu_per_channel,
                  dtype=self.dtype,
                  batch_norm_axis=self.batch_norm_axis,
                  name=f"stage{s}_block{b}")(x, train)  # [B, H', W', stage.features]
    x = Conv(spec.head_features, 1, dtype=self.dtype, name="head")(x)
    x = act("head_act")(norm(name="head_bn")(x), train)
    x = jnp.mean(x, axis=(1, 2))  # [B, F]
    if spec.classifier_features:
      x = nn.Dense(spec.classifier_features, dtype=self.dtype, name="pre_logits")(x)
      x = act("pre_logits_act")(x, train)
    return x  # [B, F]; the heads apply the dropout.


class Expert(nn.Module):
  """One expert: a whole classifier. Returns class logits [B, K] in float32."""
  spec: Any  # A network kind's spec (`NetworkSpec.from_config`): its kind builds the body.
  num_classes: int
  dtype: Any = jnp.float32
  batch_norm_axis: Optional[str] = None  # Mesh axis BatchNorm reduces over (in shard_map).
  remat: str = "none"  # config_base.REMAT_MODES; "full" saves only the images.

  @nn.compact
  def __call__(self,
               images: jax.Array,
               train: bool = False,
               with_deterministic: bool = False,
               example_index: Optional[jax.Array] = None):
    """Logits [B, K]; with `with_deterministic`, also those without dropout.

    Dropout acts on the pooled features only, so the logits without it come
    from the same pass (same BatchNorm batch statistics) for one extra
    [B, F] x [F, K] product: the objective scores experts on them.
    `example_index` [B]: the images' positions in the global batch, which
    draw their dropout masks (`example_dropout`).
    """
    features = _rematerialised(kinds.of(self.spec).module,
                               self.remat == "full")(spec=self.spec,
                                                     dtype=self.dtype,
                                                     batch_norm_axis=self.batch_norm_axis,
                                                     remat=self.remat,
                                                     name="backbone")(images, train)  # [B, F]
    classifier = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")
    dropped = example_dropout(self, self.spec.dropout_rate, features, train,
                              example_index)  # [B, F]
    logits = classifier(dropped).astype(jnp.float32)  # [B, K]
    if not with_deterministic:
      return logits
    return logits, classifier(features).astype(jnp.float32)  # [B, K], [B, K]


class Delegator(nn.Module):
  """The delegator: one backbone, two heads.

  Returns class logits [B, K] (the rough prediction that may exit early) and
  selection logits [B, N] (which expert should answer), both float32.
  """
  spec: Any  # A network kind's spec (`NetworkSpec.from_config`): its kind builds the body.
  num_classes: int
  num_experts: int
  dtype: Any = jnp.float32
  remat: str = "none"  # config_base.REMAT_MODES

  @nn.compact
  def __call__(self,
               images: jax.Array,
               train: bool = False,
               example_index: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """`example_index` [B]: as for `Expert`."""
    features = _rematerialised(kinds.of(self.spec).module,
                               self.remat == "full")(spec=self.spec,
                                                     dtype=self.dtype,
                                                     remat=self.remat,
                                                     name="backbone")(images, train)  # [B, F]
    features = example_dropout(self, self.spec.dropout_rate, features, train,
                               example_index)  # [B, F]
    class_logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(features)
    selection_logits = nn.Dense(self.num_experts, dtype=self.dtype, name="selector")(features)
    return class_logits.astype(jnp.float32), selection_logits.astype(jnp.float32)
