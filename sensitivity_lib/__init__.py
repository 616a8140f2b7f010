"""sensitivity_lib: the library under the book *Sensitivity of Deep Neural Networks*.

Modules
-------
results     small result objects (value, kind, method, norm, iterations, residual)
data        offline datasets in [0,1] pixel space, and full-scale loaders for user-supplied data
zoo         model wrappers (normalisation inside), pretrained loaders, deterministic training
plotting    one figure style and helpers that take ``ax``
profiles    the PROFILE switch (quick / book / full) and reproducible set-up for notebooks
"""

from sensitivity_lib.results import Estimate

__all__ = ["Estimate"]
__version__ = "0.1.0"
