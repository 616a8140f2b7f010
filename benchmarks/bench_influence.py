"""Benchmark: images per second of the influence measure (FI), ours against a naive loop.

Model: the SA_DNN-style ResNet-50 trained in the book (MNIST 28x28, ``book`` recipe of
Part II ch. 5, width 8; trained and cached on first use, or random weights with ``--random``).

For each perturbation (``wrt``) the naive baseline is what a direct port of the authors' code does
(:func:`sensitivity_lib.influence.reference_loop`): per image and per class, one forward pass and
one backward pass of ``p_k`` (``torch.autograd``), then the authors' SVD chain on the
``dim(omega) x C`` matrix, once for the image (``input``), once per channel-pixel (``pixels``,
s = 0), or once per trainable module (``layers``). Ours is :func:`sensitivity_lib.influence.fi`:
batched images, C backward passes per batch, C x C Grams and batched ``eigh``.

Both differentiate the network in float64 (ours by default through a cached float64 copy of the
model, the loop with ``dtype=torch.float64``) and compute the same numbers (``sa_dnn`` mode): the
table reports images per second, the ratio ours / naive measured in the same run, and the largest
relative difference between the two.

Usage::

    python benchmarks/bench_influence.py            # the book's ResNet-50
    python benchmarks/bench_influence.py --random   # random weights, nothing trained
    python benchmarks/bench_influence.py --device cuda --width 64
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from timing import timed

from sensitivity_lib import influence
from sensitivity_lib.influence.sa_dnn import recalibrate_bn, sa_resnet50

C = 10


def naive(model, x, wrt):
    return influence.reference_loop(model, x, wrt, dtype=torch.float64)


def ours(model, x, wrt):
    r = influence.fi(model, x, wrt=wrt, mode="sa_dnn")
    if wrt == "layers":
        return r.matrix()[1].cpu().numpy()
    return r.value.reshape(x.shape[0], -1).squeeze(-1).cpu().numpy()



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random", action="store_true", help="random weights (no training)")
    ap.add_argument("--width", type=int, default=8, help="ResNet width (book: 8, paper: 64)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SENSITIVITY_THREADS", "0")),
                    help="torch threads (default: $SENSITIVITY_THREADS, else torch's default)")
    ap.add_argument("--n", type=int, default=64, help="images for ours")
    ap.add_argument("--n-naive", type=int, default=4, help="images for the naive loop")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from sensitivity_lib import data, zoo

    if args.random:
        net = sa_resnet50(1, C, width=args.width)
        model = zoo.Normalized(net, (0.1307,), (0.3081,), input_shape=(1, 28, 28),
                               classes=[str(i) for i in range(C)], name="sa_resnet50",
                               pretrained=False, weights_note="random initialisation")
        note = "random weights"
    else:
        recipe = zoo.Recipe("sa_resnet50", dataset="mnist5k", epochs=2, n_train=3000,
                            n_test=1000, arch_kwargs=(("width", args.width), ("dropout", 0.0)))
        model, _ = zoo.train(recipe)
        train, test = zoo.recipe_data(recipe)
        recalibrate_bn(model, train.images[:1000])
        note = f"trained, test accuracy {model.accuracy(test.images, test.labels):.3f}"
    model = model.to(args.device).eval()
    x = data.mnist5k().images[: args.n].to(args.device)
    xn = x[: args.n_naive]

    print(f"SA_DNN ResNet-50 (width {args.width}, {note}), MNIST 28x28, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'wrt':<8} {'naive img/s':>12} {'ours img/s':>12} {'speed-up':>9} {'max rel diff':>13}")
    for wrt in ("input", "pixels", "layers"):  # warm-up (first calls allocate and dispatch)
        ours(model, x[:2], wrt)
        naive(model, x[:1], wrt)
    for wrt in ("input", "pixels", "layers"):
        n_naive = xn.shape[0] if wrt != "layers" else max(1, xn.shape[0] // 2)
        ref, t_naive = timed(naive, model, xn[:n_naive], wrt)
        val, t_ours = timed(ours, model, x, wrt)
        if args.device == "cuda":
            torch.cuda.synchronize()
        mine = val[:n_naive].reshape(ref.shape)
        diff = float((np.abs(mine - ref) / np.maximum(np.abs(ref), 1e-300)).max(initial=0.0, where=ref != 0))
        a, b = n_naive / t_naive, x.shape[0] / t_ours
        print(f"{wrt:<8} {a:12.2f} {b:12.1f} {b / a:8.1f}x {diff:13.2e}")


if __name__ == "__main__":
    main()
