"""Flax Linen networks and layers of coe-jax.

Importing any part of the package registers the built-in network kind,
"mbconv" (`coe_jax.models.kinds`), before anything looks a kind up.
"""

from coe_jax import config_base
from coe_jax.models import kinds, networks, spec

kinds.register_kind(config_base.MBCONV,
                    spec=spec.NetworkSpec.from_mbconv_config,
                    module=networks.Backbone,
                    macs=spec.mbconv_macs)
