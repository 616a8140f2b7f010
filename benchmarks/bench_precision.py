"""Benchmark: recommend_bits's predictions for one image at 224 x 224, against the measured bit search.

Model: EfficientNet-Lite0 with its ImageNet weights (``zoo.efficientnet_lite0()``), on the first
ImageNet photo of :func:`sensitivity_lib.data.imagenet_samples` (224 x 224, [0, 1] pixels).

Timed, per target (inputs, weights, activations, all three):

* predicted: the condition numbers a prediction needs -- E0 (Lanczos, ``tol``) for the inputs,
  :func:`~sensitivity_lib.precision.bits.weight_condition` and
  :func:`~sensitivity_lib.precision.bits.activation_condition` (Lanczos in the 1000-dim output
  space, ``torch.func`` jvp / vjp) for weights and activations, all of them for "all"; and E1
  (the certified input count: certified layer norms, cached per layer after the first call) in its
  own row;
* baseline, measured in the same run: :func:`~sensitivity_lib.precision.bits.measured_bits`, the
  scan over significand widths 16, 15, ..., 1 (one rounded copy of the model and one forward pass
  per width) through :func:`sensitivity_lib.search.flip_search`.

The ratio is predicted / measured seconds (below 1: the prediction is cheaper than the search it
replaces). Both are printed with the bit counts they give.

Usage::

    python benchmarks/bench_precision.py
    python benchmarks/bench_precision.py --size 64 --threads 2
"""

from __future__ import annotations

import argparse
import os

import torch
from timing import timed

from sensitivity_lib import condition, data, precision, zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=224, help="image side")
    ap.add_argument("--tol", type=float, default=1e-2, help="Lanczos tolerance")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SENSITIVITY_THREADS", 1)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = zoo.efficientnet_lite0().eval()
    x = data.imagenet_samples(args.size).images[:1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        y = model(x).double()

    e0, t_e0 = timed(condition.local_condition, model, x, tol=args.tol, generator=g)
    e1, t_e1 = timed(condition.global_condition, model, x)
    w, t_w = timed(precision.weight_condition, model, x, tol=args.tol, generator=g)
    a, t_a = timed(precision.activation_condition, model, x, tol=args.tol, generator=g)
    p = precision.predicted_bits(model, x, conditions={"E0": e0, "E1": e1, "weights": w, "activations": a})
    cost = {"inputs": t_e0, "weights": t_w, "activations": t_a, "all": t_e0 + t_w + t_a}

    print(f"EfficientNet-Lite0, one photo at {args.size} x {args.size}, {args.threads} thread(s)")
    print(
        f"{'target':12s} {'predicted s':>11s} {'measured s':>10s} {'ratio':>6s} {'bits 1st order':>14s} "
        f"{'bits measured':>13s}"
    )
    total_m = 0.0
    for target in precision.TARGETS:
        m, t_m = timed(precision.measured_bits, model, x, target)
        total_m += t_m
        print(
            f"{target:12s} {cost[target]:11.2f} {t_m:10.2f} {cost[target] / t_m:6.2f} "
            f"{float(p[f'{target} first-order'][0]):14.0f} {int(m[0]):13d}"
        )
    mi = precision.measured_bits(model, x, "inputs")
    print(
        f"{'inputs (E1)':12s} {t_e1:11.2f} {'':>10s} {'':>6s} {float(p['inputs certified'][0]):14.0f} "
        f"{int(mi[0]):13d}   certified"
    )
    total_p = t_e0 + t_w + t_a  # one E0, one kappa_w, one kappa_a give every first-order row
    print(f"{'total':12s} {total_p:11.2f} {total_m:10.2f} {total_p / total_m:6.2f}")
    assert float(p["inputs certified"][0]) >= int(mi[0])
    del y


if __name__ == "__main__":
    main()
