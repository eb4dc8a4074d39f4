"""The config schema: each key's rule, unknown and missing keys, saved configs of older runs."""

import json
import os

import ml_collections
import pytest

from coe_jax import config_base, run_dir
from coe_jax.config_loading import load_config
from coe_jax.errors import CoEError
from coe_jax.models.coe import CoE
from coe_jax.training import train
from coe_jax.training.saved_run import load_for_inference
from tests.tiny import config_path, tiny_config


def _dotted(config, prefix=""):
  """Every dotted key of `config`, the networks' included."""
  for name in config.keys():
    value = config[name]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _dotted(value, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}"


def _set(config, key, value):
  *sections, name = key.split(".")
  for part in sections:
    config = config[part]
  with config.ignore_type():
    config[name] = value


@pytest.mark.parametrize("key", list(_dotted(tiny_config())))
def test_every_key_refuses_a_value_of_no_kind_in_one_line_naming_it(key):
  """An object of no meaning (what a typo'd override could become) fails each key's rule."""
  config = tiny_config()
  config_base.validate(config)  # Valid before...
  _set(config, key, {"not": "a value"})
  with pytest.raises(CoEError) as error:
    config_base.validate(config)
  message = str(error.value)
  assert message.startswith(f"{key}=") and "\n" not in message, message


@pytest.mark.parametrize("key, value, fragment", [
    ("train.num_steps", 2.5, "train.num_steps=2.5: expected a positive integer"),
    ("train.momentum", 1.0, "train.momentum=1.0: expected a value in [0, 1)"),
    ("expert_loop", "spiral", "expert_loop='spiral': expected one of auto, unroll, scan, vmap"),
    ("mesh.data", 0, "mesh.data=0: expected -1 (all remaining devices) or a positive integer"),
    ("data.num_classes", 1, "data.num_classes=1: expected None (from the data) or at least 2"),
    ("train.eval_every_steps", -1, "train.eval_every_steps=-1: expected a non-negative integer"),
    ("expert.condconv_from_stage", -1, "expert.condconv_from_stage=-1: expected a non-negative"),
])
def test_values_out_of_range_name_key_value_and_range(key, value, fragment):
  config = tiny_config()
  _set(config, key, value)
  with pytest.raises(CoEError,
                     match="^" +
                     fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
    config_base.validate(config)


def test_a_misspelt_key_is_refused_with_the_nearest_name():
  """ConfigDict lets `config.train.num_step = 5` add a new key; validation catches it."""
  config = tiny_config()
  config.train.num_step = 5
  with pytest.raises(CoEError,
                     match=r"^train\.num_step=5: no such key in train "
                     r"\(did you mean num_steps\?\)$"):
    config_base.validate(config)
  config = tiny_config()
  config.expert.stages = (dict(config.expert.stages[0], kernal=3),)
  with pytest.raises(CoEError, match=r"^expert\.stages\[0\]\.kernal=3: no such stage key"):
    config_base.validate(config)
  with pytest.raises(CoEError, match=r"^network\(stem_strid=\.\.\.\): no such network key"):
    config_base.network(stem_features=8,
                        head_features=16,
                        stem_strid=1,
                        stages=[config_base.stage(8, 1, 3, 1, 1)])


def test_a_missing_key_is_named():
  config = tiny_config()
  del config.train["momentum"]
  with pytest.raises(CoEError, match=r"^train\.momentum=None: missing from the config$"):
    config_base.validate(config)
  config = tiny_config()
  config.train.stages = dict(warmup=0.5, coadapt=0.5)  # A stage left out has length 0.
  config_base.validate(config)


def test_the_trainer_validates_before_reading_data(tmp_path):
  config = tiny_config()
  config.data.name = "image_folder"
  config.data.path = str(tmp_path / "nowhere")  # Would fail if the data were opened first.
  config.train.momentum = 2.0
  with pytest.raises(CoEError, match=r"^train\.momentum=2\.0"):
    train.Trainer(config, str(tmp_path / "run"))


def test_config_files_are_validated_when_loaded(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text(f"import runpy\n"
                  f"def get_config():\n"
                  f"  c = runpy.run_path({config_path('digits')!r})['get_config']()\n"
                  f"  c.train.batch_size = 0\n"
                  f"  return c\n")
  with pytest.raises(CoEError, match=r"^train\.batch_size=0: expected a positive integer$"):
    load_config(str(path))


def test_a_saved_config_of_an_older_run_is_upgraded():
  """Runs saved before `routing.expert_loop` moved to the top level still load."""
  saved = json.loads(tiny_config().to_json())
  saved["routing"]["expert_loop"] = saved.pop("expert_loop")
  upgraded = config_base.upgrade(saved)
  assert upgraded == json.loads(tiny_config().to_json())
  assert "expert_loop" in saved["routing"]  # The argument is left as it was.
  config_base.validate(ml_collections.ConfigDict(upgraded))


def test_keys_added_since_a_run_was_saved_take_defaults_that_train_as_it_did():
  saved = json.loads(tiny_config().to_json())
  for key in ("schedule", "generalist_warmup", "init_from", "checkpoint_every_secs"):
    del saved["train"][key]
  del saved["loss"]["selection_in_warmup"]
  saved["train"]["stages"] = {"warmup": 1.0}  # A stage left out stays out.
  upgraded = config_base.upgrade(saved)
  assert upgraded["train"]["schedule"] == "per_stage"
  assert upgraded["train"]["generalist_warmup"] is False and upgraded["train"]["init_from"] == ""
  assert upgraded["loss"]["selection_in_warmup"] is False
  assert upgraded["train"]["stages"] == {"warmup": 1.0}
  config_base.validate(ml_collections.ConfigDict(upgraded))


def test_load_for_inference_reads_an_older_runs_config(tmp_path, monkeypatch):
  """The predictor and the exporter load an old workdir's config.json through the upgrade."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  saved = json.loads(tiny_config().to_json())
  saved["routing"]["expert_loop"] = saved.pop("expert_loop")
  run_dir.write_json(os.path.join(workdir, run_dir.CONFIG), saved)
  # No run.json: loading stops right after the config was read and validated.
  with pytest.raises(CoEError, match="no run.json"):
    load_for_inference(str(workdir))
  saved["routing"]["expert_loop"] = "spiral"
  run_dir.write_json(os.path.join(workdir, run_dir.CONFIG), saved)
  with pytest.raises(CoEError, match="^expert_loop='spiral'"):
    load_for_inference(str(workdir))


def test_a_config_without_networks_is_refused_by_the_model():
  config = tiny_config()
  del config["expert"]
  config_base.validate(config)  # The schema's keys are all there...
  with pytest.raises(CoEError, match=r"^expert=None: missing from the config"):
    CoE(config, num_classes=10)  # ...but the model needs the networks.
