"""Benchmark: the 16 conv operator norms of VGG-19 at 224x224, to 1e-3 relative accuracy.

Run::

    python benchmarks/bench_opnorm.py                 # the full comparison (slow: the baseline)
    python benchmarks/bench_opnorm.py --power-cap 0   # skip the power-iteration baseline
    python benchmarks/bench_opnorm.py --size 64 --layers 0,4,8

What is timed, all in the same run, on ``torchvision.models.vgg19(weights=None)`` seeded with 0
(ImageNet weights are not available offline; the algorithms do not care):

``ours``
    ``operator_norm(conv, shape, "lanczos", tol=1e-3)``: float32 Lanczos with partial
    re-orthogonalisation; on 224 and 112 inputs started from the plane wave of the same layer
    solved at 56x56 (``multiscale_start``), else from a random vector; value re-evaluated in
    float64.
``power``
    Plain power iteration on ``A^T A`` (float32, random start, torch's own convolutions: what
    ``ours`` gains from Winograd's ``F(4x4, 3x3)`` counts in the ratio), stopped by an oracle as soon as
    ``||A v|| / ||v||`` is within 1e-3 of the reference, capped at ``--power-cap`` iterations
    (a capped layer makes the reported speed-up a lower bound).
``fft``
    The certified upper bound (circular convolution on the smallest valid periodic grid,
    Cholesky certificates per frequency, ``operator_norm(..., "fft", lower=ref, tol=1e-3)``).

Not timed: the reference, the best of ``ours`` and of a Lanczos run from a fresh random start to
``tol=1e-7`` (a run continued from ``ours``' vector could stay on the same peak of the symbol).
The accuracy of ``ours`` is ``1 - ours / ref``, and ``fft / ref - 1`` is the certified gap (so
``ref`` is within that gap of the true norm). Times are wall-clock seconds and, in brackets, CPU
seconds of this process (steadier when the machine is shared). The last line converts ``ours`` into
*power steps*: one ``A^T A`` product of every layer, timed just before and after ``ours`` (which runs
first, for all layers, so that the baselines' memory churn is not billed to it). On a
shared machine the seconds drift with its speed (the same convolution was measured up to 25%
slower within an hour); the count of steps does not.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
import torchvision
from torch import nn

from sensitivity_lib.opnorm import conv_operator, operator_norm


def vgg19_convs(size: int) -> list[tuple[str, nn.Conv2d, tuple[int, int, int]]]:
    torch.manual_seed(0)
    feats = torchvision.models.vgg19(weights=None).features.eval()
    out, x, block, idx = [], torch.zeros(1, 3, size, size), 1, 1
    with torch.no_grad():
        for layer in feats:
            if isinstance(layer, nn.Conv2d):
                out.append((f"conv{block}_{idx}", layer, tuple(x.shape[1:])))
                idx += 1
            if isinstance(layer, nn.MaxPool2d):
                block, idx = block + 1, 1
            x = layer(x)
    return out


class Clock:
    """Accumulates wall-clock and process CPU seconds of the timed blocks."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self.last = 0.0

    @contextmanager
    def __call__(self):
        w, c = time.perf_counter(), time.process_time()
        yield
        self.last = time.perf_counter() - w
        self.wall += self.last
        self.cpu += time.process_time() - c


def plain_power(conv, shape, target: float, cap: int) -> tuple[float, int]:
    """Power iteration from a random start until sigma >= target (or cap); returns (sigma, its)."""
    op = conv_operator(conv, shape, torch.float32)
    g = torch.Generator().manual_seed(0)
    v = torch.randn((1, *shape), generator=g)
    v = v / v.norm()
    sigma = 0.0
    for k in range(1, cap + 1):
        y = op.matvec(v)
        sigma = float(y.double().norm())
        if sigma >= target:
            return sigma, k
        v = op.rmatvec(y)
        v = v / v.norm()
    return sigma, cap


def power_step_seconds(layers, repeats: int = 5) -> float:
    """Wall seconds of one ``A^T A`` product of every layer (float32), the median of ``repeats``.

    The yardstick of the issue ("one power-iteration step over all of them costs about two forward
    passes"): the same number of steps costs more or less seconds as this machine speeds up or
    slows down, so the benchmark prints ``ours`` in these steps too.
    """
    ops = [conv_operator(conv, shape, torch.float32) for _, conv, shape in layers]
    xs = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)) for _, _, shape in layers]
    for op, x in zip(ops, xs, strict=True):
        op.rmatvec(op.matvec(x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for op, x in zip(ops, xs, strict=True):
            op.rmatvec(op.matvec(x))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--power-cap", type=int, default=1000)
    ap.add_argument("--no-fft", action="store_true", help="skip the certified FFT upper bound")
    ap.add_argument("--layers", type=str, default="", help="comma-separated indices (default all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = vgg19_convs(args.size)
    if args.layers:
        layers = [layers[int(i)] for i in args.layers.split(",")]
    # warm-up: first calls of conv kernels / FFT pay one-off costs that belong to neither method
    small = nn.Conv2d(8, 8, 3, padding=1)
    operator_norm(small, (8, 16, 16), "lanczos")
    operator_norm(small, (8, 16, 16), "fft", lower=1.0)

    step_before = power_step_seconds(layers)
    rows = []
    c_ours, c_pow, c_fft = Clock(), Clock(), Clock()
    capped = 0
    # ours first, for every layer, so that no other method's memory churn is billed to it
    ours_all, ours_secs = [], []
    for _, conv, shape in layers:
        with c_ours():
            ours_all.append(operator_norm(conv, shape, "lanczos", tol=args.tol))
        ours_secs.append(c_ours.last)
    step_after = power_step_seconds(layers)
    for (name, conv, shape), ours, secs in zip(layers, ours_all, ours_secs, strict=True):
        ref = operator_norm(conv, shape, "lanczos", tol=1e-7, max_iter=200, init="random")
        ref_v = max(ref.value, ours.value)
        its_pow, dt_pow = 0, float("nan")
        if args.power_cap > 0:
            with c_pow():
                _, its_pow = plain_power(conv, shape, ref_v * (1 - args.tol), args.power_cap)
            dt_pow = c_pow.last
            capped += its_pow == args.power_cap
        up, dt_fft = float("nan"), float("nan")
        if not args.no_fft:
            with c_fft():
                up = operator_norm(conv, shape, "fft", lower=ref_v, tol=args.tol).value
            dt_fft = c_fft.last
        rows.append((name, shape, ours.value, ref_v, up))
        print(
            f"{name:8s} {str(shape):16s} ours {ours.value:.6f} ({ours.iterations:3d} it, "
            f"{secs:6.2f} s, err {1 - ours.value / ref_v:8.1e})  ref {ref_v:.6f}  "
            f"power {its_pow:4d} it {dt_pow:7.2f} s  "
            f"fft {up:.6f} (gap {up / ref_v - 1:8.1e}, {dt_fft:6.2f} s)",
            flush=True,
        )
    worst = max(1 - r[2] / r[3] for r in rows)
    step = (step_before + step_after) / 2
    print()
    print(f"VGG-19 (random init, seed 0), {len(rows)} conv layers at {args.size}x{args.size}, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'method':34s} {'wall s':>8s} {'cpu s':>8s} {'ratio(wall)':>12s} {'ratio(cpu)':>11s}")
    print(f"{'ours (multiscale/random + Lanczos)':34s} {c_ours.wall:8.2f} {c_ours.cpu:8.2f} "
          f"{1.0:12.2f} {1.0:11.2f}")  # fmt: skip
    if args.power_cap > 0:
        mark = ">=" if capped else "  "
        print(f"{'plain power to the same accuracy':34s} {c_pow.wall:8.2f} {c_pow.cpu:8.2f} "
              f"{mark}{c_pow.wall / c_ours.wall:10.2f} {mark}{c_pow.cpu / c_ours.cpu:9.2f}")  # fmt: skip
        if capped:
            print(f"  ({capped} layer(s) hit the cap of {args.power_cap} iterations)")
    if not args.no_fft:
        gap = max(r[4] / r[3] - 1 for r in rows)
        print(f"{'fft certified upper bound':34s} {c_fft.wall:8.2f} {c_fft.cpu:8.2f} "
              f"{c_fft.wall / c_ours.wall:12.2f} {c_fft.cpu / c_ours.cpu:11.2f}")  # fmt: skip
        print(f"largest certified gap fft/ref - 1: {gap:.1e}")
    print(f"largest error of ours 1 - ours/ref: {worst:.1e} (requested {args.tol:g})")
    print(f"one power step over all {len(rows)} layers (A^T A each, mean of the medians just before "
          f"and after ours): {step:.3f} s; ours = {c_ours.wall / step:.1f} such steps")  # fmt: skip


if __name__ == "__main__":
    main()
