"""An image folder's classes in N groups of whole superclasses, written as image folders.

`coe_jax.ablate`'s ceiling (`coe_oracle_groups`) trains one expert per group
on that group's images alone, and a router on the group labels. Both read
ordinary `image_folder` layouts, which `write_group_folders` makes of
symbolic links into the source folder (no image is copied):

    OUT/group<j>/{train,test}/<fine class>     -> SOURCE/{train,test}/<fine class>
    OUT/router/{train,test}/group<j>/<class>__<file> -> SOURCE/.../<class>/<file>

The groups (our reading of the issue's "N=4: 5 superclasses each"): the
superclasses of `SOURCE/coarse.json` in name order, cut into N runs of equal
length; group j holds every fine class of its superclasses.
"""

import json
import os
import shutil
import tempfile

from coe_jax.errors import CoEError, require

# Each fine class's superclass, in the source folder (CIFAR-100's layout).
COARSE = "coarse.json"
SPLITS = ("train", "test")
# What `write_group_folders` wrote, to reuse a finished output.
MANIFEST = "groups.json"


def class_groups(root: str, num_groups: int) -> list[list[str]]:
  """The fine classes of `root/train` in `num_groups` groups of whole superclasses."""
  require(
      isinstance(num_groups, int) and num_groups >= 1, "num_groups", num_groups,
      "expected a positive integer")
  coarse_path = os.path.join(root, COARSE)
  if not os.path.isfile(coarse_path):
    raise CoEError(f"data.path={root!r}: no {COARSE} (each class's superclass) to group by")
  with open(coarse_path, encoding="utf-8") as f:
    coarse = json.load(f)
  classes = sorted(c for c in os.listdir(os.path.join(root, "train"))
                   if os.path.isdir(os.path.join(root, "train", c)))
  missing = [c for c in classes if c not in coarse]
  if missing:
    raise CoEError(f"{coarse_path}: no superclass for classes {missing[:5]}")
  superclasses = sorted({coarse[c] for c in classes})
  require(
      len(superclasses) % num_groups == 0, "num_groups", num_groups,
      f"expected a divisor of the {len(superclasses)} superclasses in {coarse_path}")
  per_group = len(superclasses) // num_groups
  return [[c
           for c in classes
           if coarse[c] in superclasses[j * per_group:(j + 1) * per_group]]
          for j in range(num_groups)]


def write_group_folders(root: str, num_groups: int, out: str) -> dict[str, str]:
  """Writes the groups' and the router's image folders under `out`; returns their paths
  ({"group0": ..., "router": ...}). A finished `out` of the same groups is reused;
  the folders appear whole or not at all (written beside `out`, then renamed)."""
  groups = class_groups(os.path.abspath(root), num_groups)
  paths = {f"group{j}": os.path.join(out, f"group{j}") for j in range(num_groups)}
  paths["router"] = os.path.join(out, "router")
  manifest = {"source": os.path.abspath(root), "groups": groups}
  manifest_path = os.path.join(out, MANIFEST)
  if os.path.isfile(manifest_path):
    with open(manifest_path, encoding="utf-8") as f:
      if json.load(f) == manifest:
        return paths
    raise CoEError(f"out={out!r}: holds the groups of another folder or N; remove it")
  source = manifest["source"]
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".groups-", dir=parent)
  try:
    for j, group in enumerate(groups):
      for split in SPLITS:
        split_dir = os.path.join(staging, f"group{j}", split)
        os.makedirs(split_dir)
        router_dir = os.path.join(staging, "router", split, f"group{j}")
        os.makedirs(router_dir)
        for c in group:
          os.symlink(os.path.join(source, split, c), os.path.join(split_dir, c))
          for name in os.listdir(os.path.join(source, split, c)):
            os.symlink(os.path.join(source, split, c, name),
                       os.path.join(router_dir, f"{c}__{name}"))
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1)
    if os.path.exists(out):
      os.rmdir(out)  # Empty (no manifest, so nothing finished): a rename needs it gone.
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return paths
