"""Benchmark: the predicted distances to the decision boundary, per image, against one DeepFool run.

Timed, per image, on the same image and thread count:

* ``certified_radius``: :func:`sensitivity_lib.condition.certified_radius`, one forward pass given the
  network's certified Lipschitz bound ``L``; the bound itself depends on the weights only and is
  computed once per network (its time is shown separately, ``L once``);
* ``first_order_radius``: :func:`sensitivity_lib.condition.first_order_radius`, one forward pass
  and one backward pass per class among the ``top`` = 10 largest logits;
* baseline: one DeepFool run (:func:`sensitivity_lib.attacks.minimal_perturbation`,
  ``method="deepfool"``: ART's DeepFool, at most 50 iterations, overshoot 0.02, the gradients of the
  10 largest logits at every iteration).

Models: EfficientNet-Lite0 at 224 x 224 (ImageNet photos from foolbox) and advertorch's standard and
adversarially trained LeNet5 (MNIST test digits). The ratios ``DeepFool / radius`` are measured in
the same run; the first call of each function on each model is a warm-up and is not timed.

Usage::

    python benchmarks/bench_tightness.py              # 2 images per model
    python benchmarks/bench_tightness.py --n 5 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from timing import timed

from sensitivity_lib import attacks, condition, data, zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2, help="images per model")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SENSITIVITY_THREADS", 1)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "EfficientNet-Lite0 (224)": (zoo.efficientnet_lite0().eval(), data.imagenet_samples(224).images),
        "LeNet5 standard": (zoo.lenet5("standard"), data.mnist_test20().images),
        "LeNet5 adv. trained": (zoo.lenet5("adversarial"), data.mnist_test20().images),
    }
    print(f"threads={args.threads}, {args.n} image(s) per model; seconds per image")
    head = (f"{'model':26s} {'L once':>8s} {'certified':>10s} {'first-ord':>10s} {'DeepFool':>9s} "
            f"{'DF/cert':>9s} {'DF/first':>9s}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for label, (model, x) in models.items():
        L, t_L = timed(condition.lipschitz_bound, model, tuple(x.shape[1:]))
        warm = x[-1:]
        condition.certified_radius(model, warm, lipschitz=L)
        condition.first_order_radius(model, warm)
        attacks.minimal_perturbation(model, warm, method="deepfool", progress=False)
        t_c, t_f, t_d = [], [], []
        for i in range(args.n):
            xi = x[i : i + 1]
            t_c.append(timed(condition.certified_radius, model, xi, lipschitz=L)[1])
            t_f.append(timed(condition.first_order_radius, model, xi)[1])
            t_d.append(timed(attacks.minimal_perturbation, model, xi, method="deepfool", progress=False)[1])
        c, f, d = (statistics.median(t) for t in (t_c, t_f, t_d))
        print(f"{label:26s} {t_L:8.2f} {c:10.4f} {f:10.4f} {d:9.3f} {d / c:8.0f}x {d / f:8.1f}x")
    print("medians over the images; DF/cert and DF/first: one DeepFool run over one radius, same image")


if __name__ == "__main__":
    main()
