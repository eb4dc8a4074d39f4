r"""Inference throughput of routed CoE against networks of equal FLOPs.

    python -m benchmarks.inference --config=configs/digits.py --json=bench.json \
        [--batch-size=64] [--threshold=0.5 | --workdir=runs/demo] [--steps=20] [--rounds=5]
    python -m benchmarks.inference --config=configs/digits.py --json=bench.json --backend=litert \
        [--threads=2] [--threshold=... | --workdir=...]

Measured in one run, on the default device, after warm-up, on random uint8
images of the config's size, interleaved round by round so that a change in
the machine's load hits every variant alike (each variant's best round is
reported):

  coe_routed            `coe_jax.routing.route_and_predict` in serving mode:
                        delegator, early exit, the rest dispatched into
                        per-expert buffers of static capacity C, combine.
  dense_equal_flops     one plain network of the expert's architecture at CoE's
                        mean FLOPs per image. Channels round to multiples of
                        8, so widths move FLOPs in steps (0.29M, then 0.60M
                        around the digits CoE's 0.42M): the rows
                        dense_equal_flops[x<width>] time the widths next to
                        the target (`flops.bracketing_widths`) and this row
                        interpolates their images/s, linear in log-log.
  condconv_equal_flops  the same with CondConv (4 kernels) in the later half of
                        the stages.
  all_experts           the delegator and every expert on the whole batch, then
                        the early exit or the selected expert's answer is picked.

FLOPs are multiply-adds per image (`coe_jax.flops`). For CoE, `flops_per_image`
is the method's mean cost F_D + (1 - rho) F_E at the exit rate rho measured on
the benchmark images; `executed_flops_per_image` is F_D + (N C / B) F_E, what
the static buffers compute (empty slots included). Serving mode plans C with
expected_exit_rate = rho and the config's `routing.capacity_factor`.

Random variables (no --workdir) have their PWLUs moved to phase II
(`pwlu.realign`), the function a trained network computes; phase I is ReLU.
The CoE's random variables also get the running statistics (BatchNorm's,
PWLU's) of a batch of random images, as training leaves them: fresh ones (mean
0, variance 1) let activations shrink layer by layer, to ~1e-5 of the stem's
at the 194M expert's head, ranges that int8 calibration sees as near-constant
and that XNNPACK's int8 ADD then refuses, unlike a trained network's.

The threshold: --threshold if given; else with --workdir the run's calibrated
one (on random images the exit rate then says little about real data); else the
median delegator confidence on the benchmark images, so about half of them exit.

Both expert loops (vmap, unroll) are timed for coe_routed and all_experts; the
ratios use the config's `expert_loop`.

--backend=litert exports the CoE (`coe_jax.serving.export`) in float32 and in int8
(calibrated on other random images of the same size) and measures the CPU
serving path instead, on 32 images, with rates of multiply-adds against the
machine's measured float32 peak:

  litert_coe_routed[batch=1]   `coe_jax.serving.litert_predictor.LiteRTPredictor` called on one
                               image at a time (host routing per call).
  litert_coe_routed[batch=32]  the same on the batch of 32: the delegator on
                               every image, then each expert on its group.
  litert_int8_coe_routed[...]  the same two on the int8 export, with tau at its
                               own median confidence when float32's is (else
                               the same tau): a random network's confidences
                               all lie near 1/K, and int8's errors would move
                               many across float32's. Its exit rate is
                               `int8.exit_rate`.
  litert_expert                expert 0 alone on the 32 images, float32 ...
  litert_int8_expert           ... and int8: the same work whatever the routing.
  litert_dense_equal_flops     the dense_equal_flops networks, exported, on the 32
                               (interpolated as above).
  jax_coe_routed[batch=1]      `coe_jax.routing.route_and_predict` (serving mode,
                               the config's expert loop) on one image at a time:
                               its static shapes give every expert a buffer of
                               one slot, so every expert runs on every call.
  jax_coe_routed[batch=32]     the same on the batch of 32 (coe_routed above).

`ratios` holds int8 / float32 images/s for the routed CoE and the expert
(goal: int8 >= 1.5x float32). `macs_per_s` is images/s x the method's
multiply-adds per image (for CoE the mean F_D + (1 - rho) F_E, which host
routing executes exactly: no empty slots). `percent_of_peak` divides it by
`peak`, the rate of a float32 2048x2048 numpy matmul measured in the same run
(`benchmarks.peak`), for int8 too: it says how fast, not how close to int8's
own peak. `undelegated` lists per model the ops XNNPACK leaves to LiteRT's
builtin kernels.
"""

import functools
import json
import math
import os
import platform
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from benchmarks.peak import measured_peak
from coe_jax import answers, flops, routing
from coe_jax.config_base import EXPERT_LOOPS
from coe_jax.config_loading import load_config, run_command
from coe_jax.errors import CoEError
from coe_jax.models import mbconv, pwlu, stacked
from coe_jax.models.coe import CoE
from coe_jax.models.networks import Delegator, Expert
from coe_jax.models.spec import NetworkSpec
from coe_jax.models.stacked import EXPERTS
from coe_jax.training import saved_run

LITERT_BATCH = 32
# Random images whose statistics random variables get (`_data_statistics`):
# thousands of values per channel even at the last 7x7 layers of 224 px nets.
STATISTICS_IMAGES = 16


def _bracket(network: ml_collections.ConfigDict, target: float, image_size: int, channels: int,
             num_classes: int) -> dict[str, tuple[NetworkSpec, flops.Sizing]]:
  """`network` at the widths next to `target` FLOPs (`flops.bracketing_widths`),
  by variant suffix ("[x0.55]"): one width, or the two whose speeds `_at_target`
  interpolates."""
  return {
      f"[x{sizing.width_multiplier:.2f}]":
          (NetworkSpec.from_config(sizing.apply(network), "expert"), sizing)
      for sizing in flops.bracketing_widths(network, target, image_size, channels, num_classes)
  }


def _at_target(points: list[tuple[float, float]], target: float) -> float:
  """Images/s at `target` FLOPs from (FLOPs, images/s) at one or two widths:
  linear in log-log between two, as a cost that grows as a power of the FLOPs
  would be; one point is taken as it is."""
  (f0, s0), (f1, s1) = points[0], points[-1]
  if f0 == f1:
    return s0
  t = math.log(target / f0) / math.log(f1 / f0)
  return math.exp((1 - t) * math.log(s0) + t * math.log(s1))


def _time_rounds(variants: dict[str, Callable[[], Any]], steps: int,
                 rounds: int) -> dict[str, float]:
  """Seconds per call of each variant in its best round; rounds interleave the variants.

  On a shared machine other work only ever slows a round down, so the best
  round is the steadiest estimate of what the variant itself costs.
  """
  for fn in variants.values():  # Compile and warm up.
    for _ in range(2):
      jax.block_until_ready(fn())
  times = {name: [] for name in variants}
  for _ in range(rounds):
    for name, fn in variants.items():
      start = time.perf_counter()
      for _ in range(steps):
        jax.block_until_ready(fn())
      times[name].append((time.perf_counter() - start) / steps)
  return {name: min(t) for name, t in times.items()}


def _random_variables(init: Callable[..., Any], *args: Any) -> Any:
  """Fresh variables from a module's `init`, with every PWLU in phase II.

  Phase I is exactly ReLU; a trained network's PWLUs have left it, so the
  benchmark times the function they compute then.
  """
  return pwlu.realign(jax.jit(init)(*args))


def _plain_network(spec: NetworkSpec, num_classes: int,
                   images: jax.Array) -> Callable[[], jax.Array]:
  """A jitted forward pass of one network with fresh variables on `images`."""
  net = Expert(spec, num_classes)
  variables = _random_variables(net.init, jax.random.key(1), images[:1])
  apply = jax.jit(net.apply)
  return lambda: apply(variables, images)


def _all_experts(model: CoE, loop: str) -> Callable[..., jax.Array]:
  """Delegator and every expert on the whole batch; then one answer is picked."""

  @jax.jit
  def run(variables, images, threshold):
    class_logits, selection_logits = model.delegator(variables, images)  # [B, K], [B, N]
    expert_logits = model.experts(variables, images, shared_input=True, loop=loop)  # [N, B, K]
    choice = routing.expert_choice(selection_logits)  # [B]
    chosen = jnp.take_along_axis(expert_logits, choice[None, :, None], axis=0)[0]  # [B, K]
    return jnp.where(routing.exit_mask(class_logits, threshold)[:, None], class_logits, chosen)

  return run


# Parts of the routed call, timed alone beside it (`_parts`).
PARTS = ("parts:delegator", "parts:experts_on_buffers", "parts:one_expert_unsplit")


def _parts(model: CoE, variables: Any, images: jax.Array, capacity: int,
           loop: str) -> dict[str, Callable[[], Any]]:
  """The routed call's parts, each a jitted call of its own.

  parts:delegator           the delegator on the batch.
  parts:experts_on_buffers  every expert on its N x C buffer (the batch's
                            images tiled to fill the slots).
  parts:one_expert_unsplit  expert 0 on all N C slots at once: what the
                            experts would cost if splitting the batch cost
                            nothing.
  What the call takes beyond the first two is the router's own work (exit,
  assignment, gather, combine).
  """
  num_experts = model.num_experts
  slots = jnp.resize(images, (num_experts * capacity, *images.shape[1:]))  # [N * C, H, W, C]
  buffers = slots.reshape(num_experts, capacity, *images.shape[1:])  # [N, C, H, W, C]
  first = jax.tree.map(lambda v: v[:1], stacked.part(variables, EXPERTS))
  delegator = jax.jit(model.delegator)
  experts = jax.jit(lambda v, x: model.experts(v, x, shared_input=False, loop=loop))
  unsplit = jax.jit(lambda v, x: model.run_stacked(v, x, shared_input=False, loop=loop))
  return {
      "parts:delegator": lambda: delegator(variables, images),
      "parts:experts_on_buffers": lambda: experts(variables, buffers),
      "parts:one_expert_unsplit": lambda: unsplit(first, slots[None]),
  }


def _time_shares(parts: dict[str, float], routed: float) -> dict[str, float]:
  """The parts' seconds as fractions of the routed call's."""
  delegator, experts = parts["parts:delegator"], parts["parts:experts_on_buffers"]
  return dict(delegator=delegator / routed,
              experts_on_buffers=experts / routed,
              router=1 - (delegator + experts) / routed,
              one_expert_unsplit=parts["parts:one_expert_unsplit"] / routed)


def _model_and_variables(config: ml_collections.ConfigDict,
                         workdir: Optional[str],
                         compute_dtype: Optional[str] = None):
  """(config, model, variables, meta): a trained run's, or the config's with random variables.

  `compute_dtype` overrides `train.compute_dtype` of the model (not of the variables).
  """
  meta = None
  if workdir:
    config, variables, meta = saved_run.load_for_inference(workdir)
  elif not config.data.num_classes:
    raise CoEError("data.num_classes=None: set it in the config")
  if compute_dtype:
    config = config.copy_and_resolve_references()
    config.train.compute_dtype = compute_dtype
  model = CoE(config, meta["num_classes"] if meta else config.data.num_classes)
  if not workdir:
    # Running statistics while the PWLUs are still ReLUs (phase I), then the
    # PWLUs moved to phase II from them, as `_random_variables` does.
    variables = pwlu.realign(
        _data_statistics(model,
                         jax.jit(model.init)(jax.random.key(0)),
                         _random_images(STATISTICS_IMAGES, config, seed=2)))
  return config, model, variables, meta


def _data_statistics(model: CoE, variables: Any, images: np.ndarray) -> Any:
  """`variables` with every running statistic set to its value on `images` [B, S, S, C].

  One training-mode pass normalises each layer by its batch statistics, so
  each layer's are those of its input as normalised by the layers before it.
  The running averages the pass updates (new = m old + (1 - m) batch) are
  solved for the batch's. The delegator and each expert go through their own
  network, as the export does.
  """
  # BatchNorm's and PWLU's momentum, the m above.
  momentum = mbconv.BatchNorm.keywords["momentum"]
  assert pwlu.PWLU.momentum == momentum, (pwlu.PWLU.momentum, momentum)
  nets = {
      "delegator": Delegator(model.delegator_spec, model.num_classes, model.num_experts),
      "experts": Expert(model.expert_spec, model.num_classes)
  }
  stats = dict(variables["batch_stats"])
  for part, net in nets.items():
    updated = jax.jit(lambda own, net=net: net.apply(
        own, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})[1][
            "batch_stats"])
    own = {collection: tree[part] for collection, tree in variables.items()}
    if part == "delegator":
      parts = [own]
    else:  # Experts are stacked on a leading axis: one at a time, then stacked again.
      parts = [jax.tree.map(lambda v, j=j: v[j], own) for j in range(model.num_experts)]
    solved = [
        jax.tree.map(lambda new, old: (new - momentum * old) / (1 - momentum), updated(p),
                     p["batch_stats"]) for p in parts
    ]
    stats[part] = solved[0] if part == "delegator" else jax.tree.map(
        lambda *leaves: jnp.stack(leaves), *solved)
  return {**variables, "batch_stats": stats}


def _threshold(model: CoE, variables: Any, images: jax.Array, threshold: Optional[float],
               workdir: Optional[str], meta: Optional[dict[str, Any]]) -> tuple[float, str, float]:
  """(tau, where it came from, exit rate on `images`); see the module docstring."""
  class_logits, _ = jax.jit(model.delegator)(variables, images)  # [B, K]
  confidence = np.asarray(routing.confidence(class_logits))  # [B]
  if threshold is not None:
    source = "given (--threshold)"
  elif workdir:
    threshold, source = float(meta["threshold"]), f"calibrated ({workdir})"
  else:
    threshold = float(np.median(confidence))
    source = "median delegator confidence on the benchmark images (~50% exits)"
  return threshold, source, float(np.mean(answers.exits(confidence, threshold)))


def _random_images(batch_size: int, config: ml_collections.ConfigDict, seed: int = 0) -> np.ndarray:
  size, channels = config.data.image_size, config.data.channels
  return np.random.default_rng(seed).integers(0,
                                              256, (batch_size, size, size, channels),
                                              dtype=np.uint8)  # [B, S, S, C]


def run(config: ml_collections.ConfigDict, batch_size: int, threshold: Optional[float],
        workdir: Optional[str], steps: int, rounds: int) -> dict[str, Any]:
  """Measures every variant; returns the JSON report."""
  config, model, variables, meta = _model_and_variables(config, workdir)
  num_classes, num_experts = model.num_classes, model.num_experts
  size, channels = config.data.image_size, config.data.channels
  images = jnp.asarray(_random_images(batch_size, config))  # [B, S, S, C]
  threshold, source, exit_rate = _threshold(model, variables, images, threshold, workdir, meta)
  cost = flops.count(config, num_classes)
  f_d, f_e = cost["delegator_flops"], cost["expert_flops"]
  mean_flops = answers.mean_flops(f_d, f_e, exit_rate)
  # Serving mode plans with an exit rate below 1; at 0.99 C is 1 slot anyway.
  expected_exit_rate = min(exit_rate, 0.99)
  spec = {
      loop: routing.RoutingSpec("serving", config.routing.capacity_factor, expected_exit_rate, loop)
      for loop in EXPERT_LOOPS
  }
  capacity = spec["auto"].capacity(batch_size, num_experts)

  # Equal FLOPs to CoE's mean: each comparator at the widths next to it.
  brackets = {
      "dense_equal_flops":
          _bracket(config.expert, mean_flops, size, channels, num_classes),
      "condconv_equal_flops":
          _bracket(flops.condconv_network(config.expert), mean_flops, size, channels, num_classes),
  }
  variants = {}
  for loop in EXPERT_LOOPS:
    variants[f"coe_routed[{loop}]"] = functools.partial(routing.route_and_predict,
                                                        model,
                                                        variables,
                                                        images,
                                                        threshold,
                                                        spec=spec[loop])
  for loop in EXPERT_LOOPS:
    variants[f"all_experts[{loop}]"] = functools.partial(_all_experts(model, loop), variables,
                                                         images, threshold)
  for name, bracket in brackets.items():
    for suffix, (net_spec, _) in bracket.items():
      variants[name + suffix] = _plain_network(net_spec, num_classes, images)
  variants.update(_parts(model, variables, images, capacity, config.expert_loop))
  seconds = _time_rounds(variants, steps, rounds)
  parts = {name: seconds.pop(name) for name in PARTS}

  flops_of = {  # (method's FLOPs per image, FLOPs the device executes per image)
      "coe_routed": (mean_flops, f_d + num_experts * capacity / batch_size * f_e),
      "all_experts": (f_d + num_experts * f_e,) * 2,
  }
  for name, bracket in brackets.items():
    flops_of.update({name + suffix: (sizing.flops,) * 2 for suffix, (_, sizing) in bracket.items()})
  results = {}
  for name, s in seconds.items():
    method, executed = flops_of.get(name, flops_of.get(name.split("[")[0]))
    results[name] = dict(images_per_s=batch_size / s,
                         flops_per_image=float(method),
                         executed_flops_per_image=float(executed))
  for name, bracket in brackets.items():
    points = [(sizing.flops, results[name + suffix]["images_per_s"])
              for suffix, (_, sizing) in bracket.items()]
    results[name] = dict(images_per_s=_at_target(points, mean_flops),
                         flops_per_image=float(mean_flops),
                         executed_flops_per_image=float(mean_flops))
  loop = config.expert_loop
  speed = lambda name: results[name]["images_per_s"]
  routed_speed = speed(f"coe_routed[{loop}]")
  metrics = jax.device_get(variants[f"coe_routed[{loop}]"]()["metrics"])
  return dict(
      benchmark="inference",
      backend=jax.default_backend(),
      device=jax.devices()[0].device_kind,
      cpu=platform.processor(),
      batch_size=batch_size,
      steps=steps,
      rounds=rounds,
      num_experts=num_experts,
      threshold=threshold,
      threshold_source=source,
      exit_rate=exit_rate,
      capacity=capacity,
      capacity_factor=config.routing.capacity_factor,
      overflow_to_expert=int(metrics["overflow_to_expert"]),
      overflow_to_delegator=int(metrics["overflow_to_delegator"]),
      delegator_flops=f_d,
      expert_flops=f_e,
      expert_loop=loop,
      # The widths each equal-FLOPs row interpolates between (log-log in FLOPs).
      multipliers={
          name: [
              dict(width=sizing.width_multiplier, flops=sizing.flops)
              for _, sizing in bracket.values()
          ] for name, bracket in brackets.items()
      },
      results=results,
      ratios={
          "coe_routed / dense_equal_flops": routed_speed / speed("dense_equal_flops"),
          "coe_routed / condconv_equal_flops": routed_speed / speed("condconv_equal_flops"),
          "coe_routed / all_experts": routed_speed / speed(f"all_experts[{loop}]"),
      },
      # Where coe_routed's time goes (`_parts`), as fractions of its call.
      time_shares=_time_shares(parts, seconds[f"coe_routed[{loop}]"]),
      expert_loop_speed={
          "coe_routed unroll / vmap": speed("coe_routed[unroll]") / speed("coe_routed[vmap]"),
          "all_experts unroll / vmap": speed("all_experts[unroll]") / speed("all_experts[vmap]"),
      },
  )


def run_litert(config: ml_collections.ConfigDict, threshold: Optional[float],
               workdir: Optional[str], steps: int, rounds: int,
               threads: Optional[int]) -> dict[str, Any]:
  """Measures LiteRT serving, float32 and int8, against the JAX router; returns the report."""
  # TensorFlow and the LiteRT runtime are needed by this backend only.
  from coe_jax.serving import export, litert_predictor  # pylint: disable=g-import-not-at-top

  # The exported models compute in float32, so the JAX reference does too
  # (ImageNet configs train in bfloat16 for TPUs).
  config, model, variables, meta = _model_and_variables(config, workdir, "float32")
  num_classes, num_experts = model.num_classes, model.num_experts
  size, channels = config.data.image_size, config.data.channels
  images = _random_images(LITERT_BATCH, config)  # [32, S, S, C]
  median_threshold = threshold is None and not workdir
  threshold, source, exit_rate = _threshold(model, variables, images, threshold, workdir, meta)
  cost = flops.count(config, num_classes)
  f_d, f_e = cost["delegator_flops"], cost["expert_flops"]
  mean_flops = answers.mean_flops(f_d, f_e, exit_rate)
  bracket = _bracket(config.expert, mean_flops, size, channels, num_classes)
  expected_exit_rate = min(exit_rate, 0.99)  # As in `run`.
  device_images = jnp.asarray(images)  # [32, S, S, C]
  jax_routed = functools.partial(routing.route_and_predict,
                                 model,
                                 variables,
                                 threshold=threshold,
                                 spec=routing.RoutingSpec("serving", config.routing.capacity_factor,
                                                          expected_exit_rate, config.expert_loop))

  predictors = {}
  with tempfile.TemporaryDirectory() as serve_dir:
    # Calibrated on other images than the timed ones, as a real export is.
    for quantization, calibration in (("float32", None), ("int8",
                                                          _random_images(LITERT_BATCH,
                                                                         config,
                                                                         seed=1))):
      out = os.path.join(serve_dir, quantization)
      export.export_coe(model,
                        variables,
                        out,
                        class_names=[str(k) for k in range(num_classes)],
                        threshold=threshold,
                        crop_fraction=1.0,
                        model_flops=cost,
                        calibration=calibration)
      predictors[quantization] = litert_predictor.LiteRTPredictor.load(out, num_threads=threads)
    dense = {}  # By width suffix: the exported dense network.
    for suffix, (dense_spec, sizing) in bracket.items():
      dense_net = Expert(dense_spec, num_classes)
      dense_variables = jax.device_get(
          _random_variables(dense_net.init, jax.random.key(1), images[:1]))
      dense_path = os.path.join(serve_dir, f"dense{suffix}.tflite")
      with open(dense_path, "wb") as f:
        f.write(
            export.convert(lambda x, n=dense_net, v=dense_variables: {"logits": n.apply(v, x)},
                           model.image_shape))
      dense[suffix] = litert_predictor.Network(
          dense_path, {
              "sha256": litert_predictor.sha256(dense_path),
              "outputs": {
                  "logits": [1, num_classes]
              }
          }, model.image_shape, threads or litert_predictor.default_threads(sizing.flops))
  predictor, int8 = predictors["float32"], predictors["int8"]
  int8_threshold = threshold
  if median_threshold:
    # Its own median: a random network's confidences all lie near 1/K, so int8's
    # small errors move many across float32's median, and with them the work.
    int8_threshold = float(np.median(litert_predictor.confidence(int8.delegator(images)[0])))
  int8_exit_rate = float(np.mean(int8.route(images, int8_threshold)["early_exit"]))

  one, many = "[batch=1]", f"[batch={LITERT_BATCH}]"
  variants = {}
  for prefix, p, tau in (("litert_", predictor, threshold), ("litert_int8_", int8, int8_threshold)):
    variants[f"{prefix}coe_routed{one}"] = (
        lambda p=p, tau=tau: [p.route(images[i:i + 1], tau) for i in range(len(images))])
    variants[f"{prefix}coe_routed{many}"] = lambda p=p, tau=tau: p.route(images, tau)
  variants["litert_expert"] = lambda: predictor.expert(0, images)
  variants["litert_int8_expert"] = lambda: int8.expert(0, images)
  for suffix, network in dense.items():
    variants[f"litert_dense_equal_flops{suffix}"] = lambda network=network: network(images)
  variants[f"jax_coe_routed{one}"] = (
      lambda: [jax_routed(device_images[i:i + 1]) for i in range(len(images))])
  variants[f"jax_coe_routed{many}"] = lambda: jax_routed(device_images)
  seconds = _time_rounds(variants, steps, rounds)
  peak = measured_peak()  # Right after the timing, under the same load.

  def flops_per_image(name: str) -> float:
    if name.startswith("litert_dense_equal_flops"):
      return bracket[name.removeprefix("litert_dense_equal_flops")][1].flops
    if name.endswith("_expert"):
      return f_e
    rho = int8_exit_rate if name.startswith("litert_int8_") else exit_rate
    return answers.mean_flops(f_d, f_e, rho)

  results = {}
  for name, s in seconds.items():
    per_image = flops_per_image(name)
    images_per_s = LITERT_BATCH / s
    results[name] = dict(images_per_s=images_per_s,
                         flops_per_image=float(per_image),
                         macs_per_s=images_per_s * per_image,
                         percent_of_peak=100 * images_per_s * per_image / peak["macs_per_s"])
  points = [(sizing.flops, results[f"litert_dense_equal_flops{suffix}"]["images_per_s"])
            for suffix, (_, sizing) in bracket.items()]
  dense_speed = _at_target(points, mean_flops)
  results["litert_dense_equal_flops"] = dict(images_per_s=dense_speed,
                                             flops_per_image=float(mean_flops),
                                             macs_per_s=dense_speed * mean_flops,
                                             percent_of_peak=100 * dense_speed * mean_flops /
                                             peak["macs_per_s"])
  speed = lambda name: results[name]["images_per_s"]
  return dict(
      benchmark="inference",
      backend="litert",
      cpu=peak["cpu"],
      peak=peak,
      threads={
          "coe (delegator, experts)": predictor.threads,
          "dense": {
              suffix: network.threads for suffix, network in dense.items()
          }
      },
      delegates=predictor.delegates,
      undelegated=predictor.undelegated,
      int8=dict(delegates=int8.delegates,
                undelegated=int8.undelegated,
                threshold=int8_threshold,
                exit_rate=int8_exit_rate),
      batch_size=LITERT_BATCH,
      steps=steps,
      rounds=rounds,
      num_experts=num_experts,
      threshold=threshold,
      threshold_source=source,
      exit_rate=exit_rate,
      delegator_flops=f_d,
      expert_flops=f_e,
      load_average=os.getloadavg(),
      results=results,
      ratios={
          f"litert_int8_coe_routed{many} / litert_coe_routed{many}":
              speed(f"litert_int8_coe_routed{many}") / speed(f"litert_coe_routed{many}"),
          f"litert_int8_coe_routed{one} / litert_coe_routed{one}":
              speed(f"litert_int8_coe_routed{one}") / speed(f"litert_coe_routed{one}"),
          "litert_int8_expert / litert_expert":
              speed("litert_int8_expert") / speed("litert_expert"),
          f"litert_coe_routed{one} / jax_coe_routed{one}":
              speed(f"litert_coe_routed{one}") / speed(f"jax_coe_routed{one}"),
          f"litert_coe_routed{many} / jax_coe_routed{many}":
              speed(f"litert_coe_routed{many}") / speed(f"jax_coe_routed{many}"),
          f"litert_coe_routed{many} / litert_dense_equal_flops":
              speed(f"litert_coe_routed{many}") / speed("litert_dense_equal_flops"),
      },
  )


def format_litert_table(report: dict[str, Any]) -> str:
  """The LiteRT report as a table with its ratios."""
  delegates = lambda d: "/".join(sorted(set(d)))
  builtin = lambda undelegated: sorted({op for ops in undelegated for op in ops}) or "none"
  lines = [
      f"LiteRT (float32 {delegates(report['delegates'])}, int8 "
      f"{delegates(report['int8']['delegates'])}; threads {report['threads']}) "
      f"on {report['cpu']}; "
      f"threshold {report['threshold']:.4f}: {report['threshold_source']}; "
      f"exit rate {report['exit_rate']:.2f} (int8: threshold "
      f"{report['int8']['threshold']:.4f}, exit rate {report['int8']['exit_rate']:.2f})",
      f"ops on builtin kernels: float32 {builtin(report['undelegated'])}, "
      f"int8 {builtin(report['int8']['undelegated'])}", f"peak: {report['peak']['derivation']}",
      f"{'variant':<32} {'images/s':>10} {'MFLOPs/image':>13} {'GMAC/s':>8} {'% peak':>7}"
  ]
  for name, r in report["results"].items():
    lines.append(f"{name:<32} {r['images_per_s']:>10.1f} {r['flops_per_image'] / 1e6:>13.3f} "
                 f"{r['macs_per_s'] / 1e9:>8.2f} {r['percent_of_peak']:>7.1f}")
  lines += [f"{k}: {v:.2f}" for k, v in report["ratios"].items()]
  return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
  """The report as a table with its ratios."""
  lines = [
      f"batch {report['batch_size']} on {report['backend']} ({report['device']}); "
      f"threshold {report['threshold']:.4f}: {report['threshold_source']}; "
      f"exit rate {report['exit_rate']:.2f}; capacity C={report['capacity']} per expert",
      f"{'variant':<24} {'images/s':>10} {'MFLOPs/image':>13} {'executed':>9}"
  ]
  for name, r in report["results"].items():
    lines.append(f"{name:<24} {r['images_per_s']:>10.1f} {r['flops_per_image'] / 1e6:>13.3f} "
                 f"{r['executed_flops_per_image'] / 1e6:>9.3f}")
  lines += [
      f"{name}: interpolated between " +
      " and ".join(f"width x{m['width']:.2f} ({m['flops'] / 1e6:.3f}M)"
                   for m in widths)
      for name, widths in report["multipliers"].items()
  ]
  lines += [f"{k}: {v:.2f}" for k, v in {**report["ratios"], **report["expert_loop_speed"]}.items()]
  lines.append("coe_routed's time: " +
               ", ".join(f"{k} {v:.0%}" for k, v in report["time_shares"].items()))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _BACKEND.value == "litert":
    report = run_litert(load_config(_CONFIG.value), _THRESHOLD.value, _WORKDIR.value, _STEPS.value,
                        _ROUNDS.value, _THREADS.value)
  else:
    report = run(load_config(_CONFIG.value), _BATCH_SIZE.value, _THRESHOLD.value, _WORKDIR.value,
                 _STEPS.value, _ROUNDS.value)
  report["config"] = _CONFIG.value
  with open(_JSON.value, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print(format_litert_table(report) if _BACKEND.value == "litert" else format_table(report))


if __name__ == "__main__":
  # Defined here, not at import, so that other benchmarks and the tests can import this module.
  _CONFIG = flags.DEFINE_string("config", None, "Config file, e.g. configs/digits.py.")
  _JSON = flags.DEFINE_string("json", None, "Where to write the report.")
  _BATCH_SIZE = flags.DEFINE_integer("batch-size", 64, "Images per batch (jax backend).")
  _THRESHOLD = flags.DEFINE_float(
      "threshold", None, "Early-exit threshold tau (default: the --workdir run's "
      "calibrated one, else the median delegator confidence).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "A trained run: its variables and threshold.")
  _STEPS = flags.DEFINE_integer(
      "steps", 20, "Batches per variant and round (a round of 5 digits batches, 10 ms, "
      "varied by 15% between two timings of one program).")
  _ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds; each variant's best is reported.")
  _BACKEND = flags.DEFINE_enum("backend", "jax", ["jax", "litert"],
                               "jax: the variants above; litert: the exported serving path.")
  _THREADS = flags.DEFINE_integer(
      "threads", None, "LiteRT interpreter threads (litert backend; default: "
      "coe_jax.serving.litert_predictor's choice per network).")
  flags.mark_flags_as_required(["config", "json"])
  run_command(main)
