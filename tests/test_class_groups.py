"""The ceiling's class groups: whole superclasses per group, written as image folders."""

import functools
import json
import os

import jax
import pytest

from coe_jax import ablate, data, flops, run_dir
from coe_jax.data import class_groups
from coe_jax.errors import CoEError
from tests.helpers import make_image_folder, train_config

# Four fine classes in two superclasses, each class its own constant colour.
CLASSES = {
    "apple": ("RGB", (200, 30, 30)),
    "pear": ("RGB", (30, 200, 30)),
    "bus": ("RGB", (30, 30, 200)),
    "tram": ("L", 90),
}
COARSE = {"apple": "fruit", "pear": "fruit", "bus": "vehicles", "tram": "vehicles"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = make_image_folder(tmp_path_factory.mktemp("c4") / "folder", classes=CLASSES, per_class=4)
  with open(os.path.join(root, class_groups.COARSE), "w") as f:
    json.dump(COARSE, f)
  return root


def test_groups_hold_whole_superclasses_in_name_order(folder):
  assert class_groups.class_groups(folder, 2) == [["apple", "pear"], ["bus", "tram"]]
  assert class_groups.class_groups(folder, 1) == [["apple", "bus", "pear", "tram"]]
  with pytest.raises(CoEError, match=r"num_groups=3: expected a divisor of the 2 superclasses"):
    class_groups.class_groups(folder, 3)


def test_a_folder_without_superclasses_is_refused(tmp_path):
  root = make_image_folder(tmp_path / "plain", classes=CLASSES, per_class=1)
  with pytest.raises(CoEError, match="no coarse.json"):
    class_groups.class_groups(root, 2)


def test_group_and_router_folders_link_every_image_once(folder, tmp_path):
  out = str(tmp_path / "groups")
  paths = class_groups.write_group_folders(folder, 2, out)
  assert set(paths) == {"group0", "group1", "router"}
  for split in ("train", "test"):
    assert sorted(os.listdir(os.path.join(paths["group0"], split))) == ["apple", "pear"]
    assert sorted(os.listdir(os.path.join(paths["group1"], split))) == ["bus", "tram"]
    for j, group in enumerate((["apple", "pear"], ["bus", "tram"])):
      routed = sorted(os.listdir(os.path.join(paths["router"], split, f"group{j}")))
      assert routed == sorted(
          f"{c}__{f}" for c in group for f in os.listdir(os.path.join(folder, split, c)))
      for name in routed:  # Each link reads the source image.
        c, f = name.split("__")
        link = os.path.join(paths["router"], split, f"group{j}", name)
        assert os.path.realpath(link) == os.path.realpath(os.path.join(folder, split, c, f))
  # image_folder reads the router's folder as a 2-class data set.
  config = train_config()
  config.data.name, config.data.path, config.data.num_classes = "image_folder", paths[
      "router"], None
  assert data.get_info(config).num_classes == 2
  # A finished output is reused; another N over it is refused, not mixed in.
  assert class_groups.write_group_folders(folder, 2, out) == paths
  with pytest.raises(CoEError, match="holds the groups of another folder or N"):
    class_groups.write_group_folders(folder, 1, out)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".groups-")]  # No staging left.


@pytest.mark.slow
def test_the_ceiling_answers_each_image_with_its_groups_expert(folder, tmp_path, monkeypatch):
  # Every run on one device (the suite has 8 fake ones).
  monkeypatch.setattr(ablate.train, "Trainer",
                      functools.partial(ablate.train.Trainer, devices=jax.devices()[:1]))
  config = train_config(num_steps=4)
  config.num_experts = 2
  config.data.name, config.data.path, config.data.num_classes = "image_folder", folder, None
  config.eval.batch_size = 8
  workdir = str(tmp_path / "oracle")
  row = ablate.run_oracle_groups(config, 0, flops.Sizing(1.0, 0, 1.0), workdir)
  results = [
      run_dir.read_json(os.path.join(workdir, f"group{j}", run_dir.RESULTS)) for j in range(2)
  ]
  saved = [run_dir.read_json(os.path.join(workdir, f"group{j}", run_dir.CONFIG)) for j in range(2)]
  # Each group's expert: a 2-class network trained on half the images for half the steps.
  assert [r["num_test_examples"] for r in results] == [8, 8]
  assert [c["train"]["num_steps"] for c in saved] == [2, 2]
  assert [c["num_experts"] for c in saved] == [1, 1]
  assert row["group_top1"] == [r["expert_top1"][0] for r in results]
  assert row["top1"] == pytest.approx(sum(row["group_top1"]) / 2)
  assert row["mean_flops"] == results[0]["expert_flops"]
  router = run_dir.read_json(os.path.join(workdir, "router", run_dir.RESULTS))
  assert row["router_top1"] == router["expert_top1"][0] and router["num_test_examples"] == 16
  assert run_dir.read_json(os.path.join(workdir, "router", run_dir.CONFIG))["expert"] == json.loads(
      config.delegator.to_json())
  # A finished ceiling is read back, not retrained.
  assert ablate.run_oracle_groups(config, 0, flops.Sizing(1.0, 0, 1.0), workdir) == row
