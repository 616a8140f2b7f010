"""Run the per-image measurements of the chapter *How tight is the estimator at the decision?* over
several processes or GPUs, and gather them on rank 0.

The chapter (``chapters/part1/04_tightness.ipynb``) measures, for every network and image, the
certified and first-order radii, random and rounding noise, FGSM / PGD / DeepFool / Carlini-Wagner /
DDN, the condition numbers and CLEVER (:func:`sensitivity_lib.condition.tightness.measure`). At
``full`` scale (ImageNet validation images, pretrained AlexNet and VGG-19) that is hours per network,
so this script runs the same measurements, with the same settings (it reads the chapter's ``SIZES``),
on deterministic shards of the images: chunk ``c`` goes to rank ``c % world_size``, and rank 0
gathers the rows into the same tables (:mod:`sensitivity_lib.shards`). One process and several give
identical results (for a fixed thread count per process).

Usage::

    python tools/tightness.py --profile book                        # one process
    torchrun --nproc-per-node 4 tools/tightness.py --profile full   # 4 processes: gloo on CPUs,
                                                                    # nccl on GPUs (one per process)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 tools/tightness.py --profile full  # two machines

Rank 0 writes ``{"meta": ..., "results": {network: {name: tensor}}}`` to ``--out`` (default
``_build/tightness/<profile>.pt``); the chapter's ``full`` profile reads that file when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "chapters" / "part1" / "04_tightness.ipynb"


def read_sizes(notebook: Path = CHAPTER) -> dict:
    """``SIZES`` from the chapter's cell tagged ``parameters`` (executed in an empty namespace)."""
    nb = json.loads(notebook.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "parameters" in cell["metadata"].get("tags", []):
            ns: dict = {}
            exec("".join(cell["source"]), ns)  # noqa: S102 - the book's own parameters cell
            return ns["SIZES"]
    raise SystemExit(f"{notebook} has no cell tagged 'parameters'")


def smoke(options: dict) -> dict:
    """A small version of a network's options, for the test of the scale-out: DeepFool, FGSM and a short
    DDN, no CLEVER, no E0."""
    o = dict(options)
    o["attacks"] = {"deepfool": {}, "fgsm_inf": {"tol": 0.05}, "ddn": {"steps": 10}}
    o.update(clever=None, condition=False, noise_draws=1, noise_sizes=(1, 3, 5))
    return o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="full", choices=("quick", "book", "full"))
    ap.add_argument("--networks", default=None, help="comma-separated subset of the chapter's networks")
    ap.add_argument("--out", default=None, help="output file (rank 0); default _build/tightness/<profile>.pt")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SENSITIVITY_THREADS", "0")) or None,
                    help="torch threads per process (results are identical for a fixed count)")
    ap.add_argument("--backend", default=None, choices=("gloo", "nccl"),
                    help="default: nccl on GPUs, else gloo")
    ap.add_argument("--smoke", action="store_true", help="a few cheap measurements only (tests)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from sensitivity_lib import profiles, shards
    from sensitivity_lib.condition import lipschitz_bound, tightness

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    profiles.seed_everything(0)
    ctx = shards.init(args.backend)
    sizes = read_sizes()[args.profile]
    chosen = None if args.networks is None else set(args.networks.split(","))
    results, seconds = {}, {}
    for name, n, options in tightness.plan(sizes):
        if chosen is not None and name not in chosen:
            continue
        if args.smoke:
            options = smoke(options)
        chunk, seed = int(options.pop("chunk", 4)), int(options.pop("seed", 0))
        t0 = time.perf_counter()
        model, images = tightness.book_network(
            name, n, source=sizes["source"], seed=int(sizes.get("seed", 0)),
            standin_train=sizes.get("standin_train"), progress=ctx.is_main,
        )  # fmt: skip
        model = model.to(ctx.device)
        x = images.images.to(ctx.device)
        L = lipschitz_bound(model, tuple(x.shape[1:]))
        rows = tightness.measure_sharded(model, x, seed=seed, chunk=chunk, ctx=ctx, lipschitz=L,
                                         progress=ctx.is_main, **options)  # fmt: skip
        if ctx.is_main:
            rows["label"] = images.labels.clone()
            results[name] = rows
            seconds[name] = time.perf_counter() - t0
            print(f"{name}: {n} images in {seconds[name]:.0f} s on {ctx.world} process(es)", flush=True)
    if ctx.is_main:
        out = Path(args.out) if args.out else ROOT / "_build" / "tightness" / f"{args.profile}.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"profile": args.profile, "world": ctx.world, "backend": ctx.backend, "smoke": args.smoke,
                "threads": torch.get_num_threads(), "seconds": seconds, "sizes": sizes}  # fmt: skip
        torch.save({"meta": meta, "results": results}, out)
        print(f"wrote {out}")
    shards.finalize(ctx)


if __name__ == "__main__":
    main()
