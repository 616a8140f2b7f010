"""What every benchmark times with: ``timed(fn, *args, **kwargs) -> (result, wall seconds)``.

The benchmarks run as scripts (``python benchmarks/bench_x.py``), so this folder is on
``sys.path`` and they import it as ``from timing import timed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Call ``fn(*args, **kwargs)`` once; return its result and the wall-clock seconds it took."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
