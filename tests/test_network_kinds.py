"""Network kinds: a kind registered from outside the package trains, counts and predicts."""

import dataclasses
import json
import os
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from coe_jax import config_base, flops
from coe_jax.errors import CoEError
from coe_jax.evaluation import run as evaluation_run
from coe_jax.models import kinds
from coe_jax.models.coe import CoE
from coe_jax.models.networks import normalize_images
from coe_jax.models.spec import NetworkSpec
from coe_jax.serving.jax_predictor import Predictor
from coe_jax.training import checkpointing, train
from tests.helpers import single_device_trainer, train_config
from tests.tiny import REPO, tiny_config

TOY = "toy"
TOY_KEYS = dict(
    features=config_base.Key(8, config_base.POSITIVE_INT),
    kernel=config_base.Key(3, config_base.ODD_KERNEL),
    dropout_rate=config_base.Key(0.0, config_base.UNIT_INTERVAL_OPEN),
)


@dataclasses.dataclass(frozen=True)
class ToySpec:
  features: int
  kernel: int
  dropout_rate: float
  kind: ClassVar[str] = TOY

  @classmethod
  def from_entry(cls, entry, name: str) -> "ToySpec":
    del name
    return cls(entry["features"], entry["kernel"], float(entry["dropout_rate"]))


class ToyBody(nn.Module):
  """One convolution, BatchNorm (the trainer keeps `batch_stats`), ReLU, pooling."""
  spec: ToySpec
  dtype: Any = jnp.float32
  batch_norm_axis: Optional[str] = None
  remat: str = "none"

  @nn.compact
  def __call__(self, images, train: bool):
    x = normalize_images(images, self.dtype)  # [B, H, W, C]
    x = nn.Conv(self.spec.features, (self.spec.kernel,) * 2,
                use_bias=False,
                dtype=self.dtype,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train,
                     axis_name=self.batch_norm_axis,
                     dtype=self.dtype,
                     name="bn")(x)
    return jnp.mean(nn.relu(x), axis=(1, 2))  # [B, F]


def toy_macs(spec: ToySpec, image_size: int, in_channels: int, num_outputs: int) -> int:
  conv = image_size * image_size * spec.kernel * spec.kernel * in_channels * spec.features
  return conv + spec.features * num_outputs


@pytest.fixture
def toy_kind():
  kinds.register_kind(TOY, spec=ToySpec.from_entry, module=ToyBody, macs=toy_macs, keys=TOY_KEYS)
  yield
  kinds.unregister_kind(TOY)


def _toy_config(num_steps=4):
  config = train_config(num_steps=num_steps)
  config.delegator = config_base.network_of(TOY, features=4)
  config.expert = config_base.network_of(TOY, features=8, kernel=5)
  return config


def test_a_registered_kind_trains_counts_and_predicts(toy_kind, tmp_path):
  config = _toy_config()
  config_base.validate(config)
  counts = flops.count(config)
  delegator = toy_macs(ToySpec(4, 3, 0.0), 16, 3, 10 + config.num_experts)
  expert = toy_macs(ToySpec(8, 5, 0.0), 16, 3, 10)
  assert counts == {
      "delegator_flops": delegator,
      "expert_flops": expert,
      "max_flops": delegator + expert
  }
  model = CoE(config, 10)
  assert model.expert_spec == ToySpec(8, 5, 0.0)
  assert NetworkSpec.from_config(config.delegator, "delegator") == ToySpec(4, 3, 0.0)

  workdir = str(tmp_path / "run")
  trainer = single_device_trainer(config, workdir)
  state = train.train(trainer)
  results = evaluation_run.evaluate(trainer, state)
  assert results["delegator_flops"] == delegator and results["expert_flops"] == expert
  params = state.params["experts"]["backbone"]
  assert set(params) == {"conv", "bn"} and params["conv"]["kernel"].shape == (2, 5, 5, 3, 8)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["expert"]["kind"] == TOY

  predictor = Predictor.load(workdir)
  out = predictor(np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8))
  assert out["logits"].shape == (3, 10) and np.isfinite(out["logits"]).all()
  assert predictor.expert(1, np.zeros((2, 16, 16, 3), np.uint8)).shape == (2, 10)


def test_an_unknown_kind_fails_in_one_line_naming_the_registered_kinds():
  config = tiny_config()
  config.expert.kind = "resnet"
  expected = (r"^expert\.kind='resnet': expected a registered network kind, one of mbconv "
              r"\(coe_jax\.models\.kinds\.register_kind adds one\)$")
  with pytest.raises(CoEError, match=expected):
    config_base.validate(config)
  with pytest.raises(CoEError, match=expected):
    CoE(config, 10)
  with pytest.raises(CoEError, match=expected):
    flops.count(config)


def test_a_registered_kind_is_named_among_the_kinds(toy_kind):
  config = tiny_config()
  config.delegator.kind = "resnet"
  with pytest.raises(CoEError, match=r"^delegator\.kind='resnet': .* one of mbconv, toy \("):
    config_base.validate(config)


def test_entries_are_checked_against_their_kinds_keys(toy_kind):
  with pytest.raises(CoEError, match=r"^network_of\('toy', stem_features=\.\.\.\): no such key"):
    config_base.network_of(TOY, stem_features=8)
  config = tiny_config()
  config.expert = config_base.network_of(TOY, features=4)
  config.expert.kernel = 2
  with pytest.raises(CoEError, match=r"^expert\.kernel=2: expected an odd kernel size$"):
    config_base.validate(config)
  mixed = tiny_config()
  mixed.expert.kind = TOY  # An MBConv network's keys under the toy kind.
  with pytest.raises(CoEError,
                     match=r"^expert\.\w+=.*: no such key in expert; expected one of kind, "
                     r"features, kernel, dropout_rate$"):
    config_base.validate(mixed)


def test_registration_is_checked_and_mbconv_stays(toy_kind):
  with pytest.raises(CoEError, match=r"^kind='toy': already registered"):
    kinds.register_kind(TOY, spec=ToySpec.from_entry, module=ToyBody, macs=toy_macs, keys={})
  with pytest.raises(CoEError, match=r"^kind='mbconv': expected a registered kind other than"):
    kinds.unregister_kind("mbconv")
  with pytest.raises(CoEError, match=r"^register_kind\('other'\)\.keys=None"):
    kinds.register_kind("other", spec=ToySpec.from_entry, module=ToyBody, macs=toy_macs)
  with pytest.raises(CoEError, match=r"^other\.size=16: expected a config_base\.Key"):
    kinds.register_kind("other",
                        spec=ToySpec.from_entry,
                        module=ToyBody,
                        macs=toy_macs,
                        keys={"size": 16})
  assert config_base.network_kinds() == ("mbconv", TOY)  # Nothing half-registered.


def test_saved_configs_and_checkpoints_of_runs_before_kinds_are_mbconv():
  with open(os.path.join(REPO, "results", "cifar10", "coe_seed0", "config.json")) as f:
    saved = json.load(f)
  for name in config_base.NETWORKS:
    saved[name].pop("kind", None)  # As every run saved before network kinds.
  upgraded = config_base.upgrade(saved)
  assert upgraded["delegator"]["kind"] == upgraded["expert"]["kind"] == "mbconv"
  config_base.validate(ml_collections.ConfigDict(upgraded))
  config = tiny_config()
  current = checkpointing.shape_fingerprint(config, 10)
  old = json.loads(json.dumps(current))
  for name in config_base.NETWORKS:
    del old[name]["kind"]
  checkpointing.check_fingerprint(old, current, "/ckpt")  # Matches: resumes, loads.
  config.expert.kind = "resnet"
  with pytest.raises(CoEError, match=r"^expert=.*the checkpoints in /ckpt were written with"):
    checkpointing.check_fingerprint(old, checkpointing.shape_fingerprint(config, 10), "/ckpt")


def test_the_toy_kind_does_not_outlive_its_fixture():
  assert config_base.network_kinds() == ("mbconv",)
  with pytest.raises(CoEError, match=r"^kind='toy': expected a registered network kind"):
    kinds.get(TOY)
