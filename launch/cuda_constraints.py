"""Writes constraints-cuda.txt: the CUDA wheels the GPU extra resolves to beside constraints.txt.

    python launch/cuda_constraints.py REPORT constraints.txt > constraints-cuda.txt

REPORT is pip's `--report` of a dry-run install of `jax[cuda12]` at the pinned
jax (`make constraints` makes it): no GPU or CUDA download is needed to pin
the versions a GPU node then installs (launch/gpu.sh takes both files).
"""

import json
import re
import sys


def canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def main(report_path: str, constraints_path: str) -> None:
  with open(constraints_path, encoding="utf-8") as f:
    pinned = {canonical(line.split("==")[0]) for line in f if "==" in line}
  with open(report_path, encoding="utf-8") as f:
    resolved = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.load(f)["install"]]
  print("# The CUDA wheels the GPU extra (`.[cuda]`, launch/gpu.sh) resolved to beside "
        "constraints.txt,\n# written by 'make constraints'; the GPU install takes both files.")
  for name, version in sorted(resolved):
    if canonical(name) not in pinned:
      print(f"{name}=={version}")


if __name__ == "__main__":
  main(*sys.argv[1:])
