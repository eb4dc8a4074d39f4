"""Network kinds: the architectures a delegator or an expert can have, by name.

A network entry of a config (`config.delegator`, `config.expert`) names its
architecture in `kind` ("mbconv" unless set). The kind supplies what differs
between architectures:

- `spec(entry, name)`: the network's spec from its validated config entry
  (`name` is "delegator", "expert", ... for errors): a frozen, hashable
  object with a `kind` attribute naming the kind (a `ClassVar[str]` of its
  class serves) and a `dropout_rate`, the heads' dropout on the pooled
  features. `NetworkSpec.from_config` validates the entry and calls it.
- `module`: the Flax module class of the network's body, built as
  `module(spec=..., dtype=..., batch_norm_axis=..., remat=..., name="backbone")`
  (so it has those fields, `batch_norm_axis` defaulting to None and `remat` to
  "none") and called as `module(...)(images, train)`: images [B, H, W, C] with
  values 0-255 (`networks.normalize_images` maps them to [-1, 1]) to pooled
  features [B, F]. It keeps a `batch_stats` collection (at least one
  BatchNorm, `batch_norm_axis` its axis name): the trainer and the
  checkpoints carry one. `networks.Expert` and `networks.Delegator` build it
  and add the heads (dropout, then the classifier, and the delegator's
  selector), so every kind has the same heads and parameter names;
  `train.remat=full` recomputes the whole body, `block` is the kind's to
  honour or ignore.
- `macs(spec, image_size, in_channels, num_outputs)`: multiply-adds of one
  forward pass of one image, heads included (`num_outputs`: the heads' total
  width, F x num_outputs multiply-adds); `coe_jax.flops.network_macs` and
  `flops.count` call it.
- `keys`: its entry's keys besides `kind`, each a `config_base.Key` (default
  and rule); `config_base.validate` checks an entry against its kind's keys and
  `config_base.network_of(kind, **values)` builds one.

One kind is built in, "mbconv" (`coe_jax.models.__init__` registers it): a
stem, stages of MBConv blocks, a 1x1 head convolution, pooling and an
optional dense layer (`config_base.network` builds its entry). Its stages
may be Fused-MBConv (`stage(..., fused=True)`) and that stays a per-stage
choice within the one kind, not a second kind: EfficientNetV2-style networks
mix fused early stages with MBConv later ones, the two block types share the
spec, the module (`MBConv(fused=...)`), the parameter names and the count,
and a "fused_mbconv" kind would either forbid that mix or duplicate the
"mbconv" kind under a name that says less than its stages do.

A kind of your own, registered from your code before the config is validated
or a model built (a saved run of that kind loads once it is registered again)::

    from coe_jax import config_base
    from coe_jax.models import kinds

    kinds.register_kind(
        "tiny",
        spec=TinySpec.from_entry,   # entry, name -> TinySpec (kind = "tiny")
        module=TinyBody,            # fields spec, dtype, batch_norm_axis, remat
        macs=tiny_macs,             # spec, image_size, in_channels, num_outputs -> int
        keys=dict(features=config_base.Key(16, config_base.POSITIVE_INT)))
    config.expert = config_base.network_of("tiny", features=32)

`unregister_kind("tiny")` removes it again (tests do, in a fixture's teardown).
tests/test_network_kinds.py registers and trains such a kind end to end.
Training, evaluation, the FLOPs count and the JAX predictor take any kind;
sizing a network to a FLOPs budget (`flops.scaled_to_flops`, the ablation's
single-network family) and `flops.condconv_network` set MBConv's
`width_multiplier` and `condconv_*` keys, so they need a kind with those keys.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn

from coe_jax import config_base
from coe_jax.errors import require


@dataclasses.dataclass(frozen=True)
class NetworkKind:
  """One network architecture: its spec builder, its module class and its count."""
  name: str
  spec: Callable[[Mapping[str, Any], str], Any]  # (validated entry, its name) -> spec
  module: type[nn.Module]  # (spec, dtype, batch_norm_axis, remat)(images, train) -> [B, F]
  macs: Callable[[Any, int, int, int], int]  # (spec, image_size, in_channels, num_outputs)


_KINDS: dict[str, NetworkKind] = {}


def register_kind(name: str,
                  *,
                  spec: Callable[[Mapping[str, Any], str], Any],
                  module: type[nn.Module],
                  macs: Callable[[Any, int, int, int], int],
                  keys: Optional[Mapping[str, config_base.Key]] = None) -> NetworkKind:
  """Registers network kind `name` (see the module docstring for each argument).

  `keys`: the kind's entry keys besides `kind`; None only for the built-in
  "mbconv", whose keys are `config_base`'s own.

  Raises:
    CoEError: if `name` is taken or not an identifier, or a key is not a `config_base.Key`.
  """
  require(name not in _KINDS, "kind", name,
          f"already registered; registered: {', '.join(_KINDS)} (unregister_kind removes one)")
  for field, value in (("spec", spec), ("module", module), ("macs", macs)):
    require(callable(value), f"register_kind({name!r}).{field}", value, "expected a callable")
  if keys is None:
    require(name == config_base.MBCONV, f"register_kind({name!r}).keys", None,
            "expected the kind's config keys (a dict of config_base.Key)")
  else:
    config_base.add_network_kind(name, keys)
  kind = NetworkKind(name, spec, module, macs)
  _KINDS[name] = kind
  return kind


def unregister_kind(name: str) -> None:
  """Removes a kind `register_kind` added (never the built-in "mbconv")."""
  require(name in _KINDS and name != config_base.MBCONV, "kind", name,
          f"expected a registered kind other than {config_base.MBCONV}")
  config_base.remove_network_kind(name)
  del _KINDS[name]


def get(name: str) -> NetworkKind:
  """The registered kind called `name`; an unknown name fails in one line naming the kinds."""
  require(
      name in _KINDS, "kind", name,
      f"expected a registered network kind, one of {', '.join(_KINDS)} "
      "(register_kind adds one)")
  return _KINDS[name]


def of(spec: Any) -> NetworkKind:
  """The kind of a network's spec (its `kind` attribute)."""
  return get(getattr(spec, "kind", None))
