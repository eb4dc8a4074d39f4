"""Classifies image files with a trained CoE run, or with its LiteRT export.

    python -m coe_jax.serving.predict --workdir=runs/demo digit.png other.jpg
    python -m coe_jax.serving.predict --serving-dir=runs/demo/serving digit.png other.jpg
    digit.png: 7  p=0.981  early exit
    other.jpg: 3  p=0.874  expert 2

Per image: the class name, its probability, and who answered (the delegator
alone on an early exit, else the expert; "delegator, experts full" is a
serving-mode overflow). Uses the run's calibrated threshold unless
--threshold is given. --workdir runs the JAX `Predictor` on the newest
checkpoint (or --step's; an unreadable one is refused, never replaced by an
older one); --serving-dir runs `coe_jax.serving.litert_predictor.LiteRTPredictor` on a
directory written by `python -m coe_jax.serving.export`, without importing JAX. A
missing or undecodable image, or a bad workdir or serving directory, is
reported in one line and the exit status is 1.
"""

import sys
from typing import Callable, Optional, Sequence

import numpy as np
from absl import flags
from PIL import Image

from coe_jax.errors import CoEError


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


def _load(workdir: Optional[str], serving_dir: Optional[str], step: Optional[int] = None):
  """The JAX predictor of a workdir, or the LiteRT one of a serving directory.

  Imported here, so that serving imports neither JAX nor TensorFlow.
  """
  # pylint: disable=g-import-not-at-top
  if serving_dir is not None:
    from coe_jax.serving.litert_predictor import LiteRTPredictor
    return LiteRTPredictor.load(serving_dir)
  from coe_jax.serving.jax_predictor import Predictor
  return Predictor.load(workdir, step)


def predict(workdir: Optional[str],
            paths: Sequence[str],
            threshold: Optional[float] = None,
            serving_dir: Optional[str] = None,
            step: Optional[int] = None) -> list[str]:
  """One result line per image; raises CoEError on bad input.

  Exactly one of `workdir` (a training run) and `serving_dir` (its export) is used;
  `serving_dir` wins if both are given.
  """
  images = [read_image(path) for path in paths]  # Bad files fail before the slow model load.
  p = _load(workdir, serving_dir, step)
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


def _flag_values() -> flags.FlagValues:
  """The command line's flags, in a FlagValues of their own, new for each `main` call.

  Not absl's global FLAGS: tests call `main` in-process, more than once and next
  to other command lines' flags of the same names (`--workdir`).
  """
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The training run's workdir (JAX).", flag_values=fv)
  flags.DEFINE_string("serving-dir",
                      None,
                      "A directory written by python -m coe_jax.serving.export (LiteRT).",
                      flag_values=fv)
  flags.DEFINE_float("threshold",
                     None,
                     "Early-exit threshold tau (default: the run's calibrated one).",
                     flag_values=fv)
  flags.DEFINE_integer("step",
                       None,
                       "With --workdir: this checkpoint's step instead of the newest.",
                       flag_values=fv)
  flags.mark_flags_as_mutual_exclusive(["workdir", "serving-dir"], required=True, flag_values=fv)
  return fv


_HELP = ("-h", "-help", "--help", "-?", "--helpshort", "--helpfull")


def parse_command_line(fv: flags.FlagValues, argv: Sequence[str], prog: str,
                       doc: str) -> Optional[list[str]]:
  """Parses `argv` (without the program's name) into `fv`; returns the positional arguments.

  None after printing `doc` and the flags' help for --help. A bad flag (unknown, a
  value that does not parse, a missing required one) raises `CoEError` with absl's
  one-line message, which names the flag and its value.
  """
  argv = list(argv)
  flag_args = argv[:argv.index("--")] if "--" in argv else argv
  if any(arg in _HELP for arg in flag_args):
    flag_help = fv.get_help(include_special_flags=False).strip().splitlines()[1:]  # Not the module.
    print(f"{doc.rstrip()}\n\nflags of {prog}:\n" + "\n".join(flag_help))
    return None
  try:
    return fv([prog, *argv])[1:]
  except flags.Error as e:
    raise CoEError(str(e)) from None


def run_command_line(fv: flags.FlagValues, argv: Optional[Sequence[str]], prog: str, doc: str,
                     body: Callable[[list[str]], None]) -> int:
  """Parses `argv` (default `sys.argv[1:]`) and runs `body` on the positional arguments.

  The exit status: 0, or 1 after one `error: ...` line for a bad flag or a
  `CoEError` from `body`. --help prints `doc` and the flags.
  """
  try:
    rest = parse_command_line(fv, sys.argv[1:] if argv is None else argv, prog, doc)
    if rest is not None:
      body(rest)
  except CoEError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line: `argv` without the program's name (default `sys.argv[1:]`); exit status."""
  fv = _flag_values()

  def body(images: list[str]) -> None:
    if not images:
      raise CoEError("expected one or more IMAGE files (png, jpg, ...)")
    print("\n".join(
        predict(fv["workdir"].value,
                images,
                fv["threshold"].value,
                serving_dir=fv["serving-dir"].value,
                step=fv["step"].value)))

  return run_command_line(fv, argv, "python -m coe_jax.serving.predict", __doc__, body)


if __name__ == "__main__":
  sys.exit(main())
