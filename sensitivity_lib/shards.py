"""Per-sample measurements over several processes or GPUs: deterministic shards, gathered on rank 0.

A measurement that treats every sample on its own (a radius, an attack, a condition number per
image) can run on a *shard* of the samples in each of several processes started by ``torchrun``
(``torch.distributed``: the ``gloo`` backend on CPUs, ``nccl`` on GPUs). This module fixes how:

* the samples are cut into *chunks* of a fixed size, the same whatever the number of processes;
  chunk ``c`` is measured by rank ``c % world_size``;
* the measurement of a chunk gets the chunk's indices and its number (to seed its random generator
  with, e.g. ``torch.Generator().manual_seed(seed + chunk)``), so that it does not depend on which
  process measured it or on what else that process measured;
* rank 0 gathers every chunk's results (``torch.distributed.gather_object``) and puts them back in
  sample order.

So the result is *identical* to one process measuring every chunk in turn, as long as every process
computes with the same number of threads (``torch.set_num_threads``) and on the same kind of device.
Without ``torchrun`` (no ``WORLD_SIZE`` in the environment, e.g. in a notebook) everything runs in the
calling process with the same chunks.

Example
-------
>>> import torch
>>> ctx = init()                                   # one process: rank 0 of 1
>>> def square(idx, chunk):                         # one chunk: its sample indices and its number
...     return {"value": idx.double() ** 2, "chunk": torch.full((len(idx),), chunk)}
>>> out = run(square, 5, chunk=2, ctx=ctx, progress=False)
>>> out["value"].tolist(), out["chunk"].tolist()
([0.0, 1.0, 4.0, 9.0, 16.0], [0, 0, 1, 1, 2])
>>> [c for c, _ in my_chunks(5, 2, rank=1, world=2)]   # what rank 1 of 2 would measure
[1]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Context", "init", "chunks", "my_chunks", "run", "finalize"]


@dataclass(frozen=True)
class Context:
    """Where this process stands: its ``rank`` among ``world`` processes, the backend
    (``None`` for a single process), the device it computes on, and whether :func:`init` started
    the process group (then :func:`finalize` ends it)."""

    rank: int = 0
    world: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    started_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(backend: str | None = None, *, device: str | torch.device | None = None) -> Context:
    """Join the process group that ``torchrun`` set up (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` in the environment), or return a one-process context when there is none.

    Parameters
    ----------
    backend
        ``"gloo"`` or ``"nccl"``; default ``"nccl"`` when the device is a CUDA GPU, else ``"gloo"``.
    device
        Default: ``cuda:<LOCAL_RANK>`` when CUDA is available and the backend is not ``"gloo"``,
        else the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return Context(device=dev)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        device = f"cuda:{local}" if use_cuda else "cpu"
    dev = torch.device(device)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("the nccl backend needs CUDA devices; use gloo on CPUs")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        started = True
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), backend=backend, device=dev,
                   started_here=started)  # fmt: skip


def chunks(n: int, chunk: int) -> list[torch.Tensor]:
    """The sample indices ``0 .. n-1`` cut into consecutive chunks of ``chunk`` (the last may be shorter)."""
    if int(n) < 0 or int(chunk) < 1:
        raise ValueError(f"need n >= 0 and chunk >= 1, got n={n}, chunk={chunk}")
    return [torch.arange(s, min(s + chunk, n)) for s in range(0, int(n), int(chunk))]


def my_chunks(n: int, chunk: int, *, rank: int, world: int) -> list[tuple[int, torch.Tensor]]:
    """``(chunk number, indices)`` of the chunks that rank ``rank`` of ``world`` measures:
    ``c % world == rank``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return [(c, idx) for c, idx in enumerate(chunks(n, chunk)) if c % world == rank]


Measure = Callable[[torch.Tensor, int], dict[str, torch.Tensor]]


def run(
    fn: Measure, n: int, *, chunk: int, ctx: Context | None = None, progress: bool = True
) -> dict[str, torch.Tensor] | None:
    """Measure ``n`` samples chunk by chunk over the processes of ``ctx``; gather on rank 0.

    Parameters
    ----------
    fn
        ``fn(indices, chunk_number) -> {name: tensor}``, every tensor with one row per index
        (first axis), computed for those samples only.
    n, chunk
        Number of samples and chunk size (fixed: it decides the chunks, not the processes).
    ctx
        From :func:`init` (default: a one-process context).
    progress
        A tqdm bar over this process's chunks (stderr).

    Returns
    -------
    dict or None
        On rank 0: ``{name: tensor}`` with the rows of all ``n`` samples in order (on the CPU);
        ``None`` on the other ranks.
    """
    from tqdm import tqdm

    ctx = ctx or Context()
    mine = my_chunks(n, chunk, rank=ctx.rank, world=ctx.world)
    kw = {} if progress else {"disable": True}
    local: list[tuple[int, dict[str, torch.Tensor]]] = []
    for c, idx in tqdm(mine, desc=f"rank {ctx.rank}: chunks", leave=False, **kw):
        out = fn(idx, c)
        for k, v in out.items():
            if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != len(idx):
                raise ValueError(f"result {k!r} of chunk {c} must be a tensor with one row per sample")
        local.append((c, {k: v.detach().cpu() for k, v in out.items()}))
    if ctx.world > 1:
        import torch.distributed as dist

        gathered: list | None = [None] * ctx.world if ctx.is_main else None
        dist.gather_object(local, gathered, dst=0)
        if not ctx.is_main:
            return None
        parts = [item for g in gathered for item in g]
    else:
        parts = local
    parts.sort(key=lambda item: item[0])
    if len(parts) != len(chunks(n, chunk)):
        raise RuntimeError(f"gathered {len(parts)} chunks, expected {len(chunks(n, chunk))}")
    keys = list(parts[0][1]) if parts else []
    return {k: torch.cat([p[k] for _, p in parts]) for k in keys}


def finalize(ctx: Context) -> None:
    """End the process group if :func:`init` started it."""
    if ctx.started_here:
        import torch.distributed as dist

        dist.destroy_process_group()
