"""Benchmark: seconds per image of the exact local condition number (E0), against ART's CLEVER.

Models (224 x 224, ImageNet photos from foolbox, [0, 1] pixels):

* VGG-19, random initialisation (``zoo.torchvision_model("vgg19", weights=None, seed=0)``), or its
  ImageNet weights when ``$TORCH_HOME`` has them and ``--imagenet`` is given;
* EfficientNet-Lite0 with its ImageNet weights (``zoo.efficientnet_lite0()``);
* LeNet5 (advertorch, MNIST 28 x 28) as a small model on which the untargeted CLEVER is run in full.

Ours: :func:`sensitivity_lib.condition.local_condition` (Lanczos on ``J J^T`` in the 1000-dim
output space, ``J v`` replayed on the traced graph (:func:`sensitivity_lib.graph.tangent_map`),
``J^T u`` by reverse-mode autograd, relative accuracy ``--tol``).

Baseline: ART's CLEVER (Weng et al. 2018) through :func:`sensitivity_lib.condition.clever_l2`,
norm 2, with ``nb_batches``, ``batch_size``, ``pool_factor``, ``radius`` below. CLEVER estimates a
different quantity (a minimal adversarial distance, from sampled gradient norms) but it is the
standard per-image gradient-based robustness score, and its cost is what a user would otherwise
pay. The untargeted score ``clever_u`` is the minimum of ``clever_t`` over the ``C - 1`` other
classes, each costing the same; on ImageNet models we run ``clever_t`` against the runner-up class
and report ``clever_u``'s time as ``(C - 1)`` times that (extrapolated, marked ``*``); on LeNet5
we run ``clever_u`` in full.

For comparison the table also shows the first-order distance predicted by E0,
``gap / (sqrt(2) ||J||)`` (no arg-max change within that 2-norm distance to first order, digest
eq. 4.3), next to the CLEVER score.

Usage::

    python benchmarks/bench_condition.py                  # 1 image per model
    python benchmarks/bench_condition.py --n 3 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from timing import timed

from sensitivity_lib import condition, data, zoo


def first_order_distance(model, x, jnorm):
    with torch.no_grad():
        top = model(x).double().topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) / (math.sqrt(2) * jnorm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1, help="images per model")
    ap.add_argument("--tol", type=float, default=1e-3, help="Lanczos tolerance of E0")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SENSITIVITY_THREADS", 1)))
    ap.add_argument("--nb-batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--pool-factor", type=int, default=2)
    ap.add_argument("--radius", type=float, default=5.0)
    ap.add_argument("--models", default="vgg19,efficientnet_lite0,lenet5")
    ap.add_argument("--imagenet", action="store_true", help="VGG-19 with ImageNet weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clever_kw = dict(nb_batches=args.nb_batches, batch_size=args.batch_size,
                     pool_factor=args.pool_factor, radius=args.radius)  # fmt: skip
    print(f"threads={args.threads}  E0 tol={args.tol}  CLEVER: {clever_kw}, norm 2")
    rows = []
    for name in args.models.split(","):
        if name == "vgg19":
            model = zoo.torchvision_model("vgg19", weights="imagenet" if args.imagenet else None)
            x = data.imagenet_samples(224).images[: args.n]
        elif name == "efficientnet_lite0":
            model = zoo.efficientnet_lite0()
            x = data.imagenet_samples(224).images[: args.n]
        elif name == "lenet5":
            model = zoo.lenet5("standard")
            x = data.mnist_test20().images[: args.n]
        else:
            raise SystemExit(f"unknown model {name!r}")
        model.eval()
        C = len(model.classes)
        condition.local_condition(model, x[:1], max_iter=2)  # warm-up: first autograd calls
        for i in range(len(x)):
            xi = x[i : i + 1]
            g = torch.Generator().manual_seed(i)
            e0, t_e0 = timed(condition.local_condition, model, xi, tol=args.tol, generator=g)
            jn = e0.extra["jacobian_norm"]
            full = name == "lenet5"
            target = None if full else "runner_up"
            cl, t_cl = timed(condition.clever_l2, model, xi, target=target, generator=g, **clever_kw)
            t_u = t_cl if full else (C - 1) * t_cl
            r_e0 = float(first_order_distance(model, xi, jn.value)[0])
            rows.append((model.name + ("" if model.pretrained else " (random init)"), i,
                         int(jn.iterations), t_e0, t_cl, t_u, not full, float(e0.extra["log2"][0]),
                         r_e0, float(cl.value[0])))  # fmt: skip
            print(".", end="", flush=True)
    print()
    head = (f"{'model':34s} {'img':>3s} {'iters':>5s} {'E0 s/img':>9s} {'CLEVER s':>9s} "
            f"{'clever_u s':>11s} {'ratio':>8s} {'log2 k':>7s} {'r_E0':>9s} {'CLEVER':>9s}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, i, it, t0, tc, tu, extrap, lk, r0, rc in rows:
        star = "*" if extrap else " "
        print(f"{name:34s} {i:3d} {it:5d} {t0:9.2f} {tc:9.2f} {tu:10.1f}{star} "
              f"{tu / t0:7.0f}x {lk:7.2f} {r0:9.3g} {rc:9.3g}")  # fmt: skip
    print("ratio = clever_u time / E0 time (same model, image and thread count, this run); "
          "* = (C - 1) x the measured clever_t time; CLEVER s = the measured call")  # fmt: skip
    print("r_E0 = top-2 logit gap / (sqrt(2) ||J||), first-order; CLEVER = the CLEVER score (L2)")


if __name__ == "__main__":
    main()
