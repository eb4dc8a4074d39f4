"""Classifies image files with a trained CoE run.

    python -m coe_jax.predict --workdir=runs/demo digit.png other.jpg
    digit.png: 7  p=0.981  early exit
    other.jpg: 3  p=0.874  expert 2

Per image: the class name, its probability, and who answered (the delegator
alone on an early exit, else the expert; "delegator, experts full" is a
serving-mode overflow). Uses the run's calibrated threshold unless
--threshold is given. A missing or undecodable image, or a bad workdir, is
reported in one line and the exit status is 1.
"""

import argparse
import sys
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from coe_jax.errors import CoEError
from coe_jax.inference import Predictor


def read_image(path: str) -> Image.Image:
  """The decoded image at `path`, any mode; CoEError naming the file if it cannot be read."""
  try:
    with Image.open(path) as image:
      image.load()  # Decodes now, so a truncated file fails here, and the file can close.
      return image
  except (FileNotFoundError, IsADirectoryError):
    raise CoEError(f"image={path!r}: no such file") from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise CoEError(f"image={path!r}: cannot decode it as an image ({e})") from None


def _answered_by(early_exit: bool, expert: int) -> str:
  if early_exit:
    return "early exit"
  return f"expert {expert}" if expert >= 0 else "delegator, experts full"


def predict(workdir: str, paths: Sequence[str], threshold: Optional[float] = None) -> list[str]:
  """One result line per image; raises CoEError on bad input."""
  images = [read_image(path) for path in paths]  # Bad files fail before the slow model load.
  p = Predictor.load(workdir)
  lines = []
  for path, image in zip(paths, images):
    pixels = np.asarray(image.convert("L" if p.channels == 1 else "RGB"))  # [H, W] or [H, W, 3]
    out = p(pixels[None], threshold)  # Sizes differ: one image per call.
    logits = out["logits"][0]
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    k = int(np.argmax(probabilities))
    lines.append(f"{path}: {p.class_names[k]}  p={probabilities[k]:.3f}  "
                 f"{_answered_by(bool(out['early_exit'][0]), int(out['expert'][0]))}")
  return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m coe_jax.predict",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the training run's workdir")
  parser.add_argument("--threshold", type=float, default=None,
                      help="early-exit threshold tau (default: the run's calibrated one)")
  parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (png, jpg, ...)")
  args = parser.parse_args(argv)
  try:
    lines = predict(args.workdir, args.images, args.threshold)
  except CoEError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
