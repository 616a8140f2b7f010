"""sensitivity_lib: the library under the book *Sensitivity of Deep Neural Networks*.

Modules
-------
results      small result objects (value, kind, method, norm, iterations, residual)
profiles     the PROFILE switch (quick / book / full) and a reproducible start for every chapter
data         offline datasets in [0, 1] pixel space; loaders for full-scale data you supply
zoo          model wrapper (normalisation inside), pretrained loaders, deterministic training
plotting     one figure style and helpers that draw on a given ``ax``
linalg       matrix-free power and Lanczos iterations
winograd     Winograd's F(4x4, 3x3) for the 3x3 convolutions inside those iterations
opnorm       operator norms of linear and convolutional layers (exact, certified upper, lower)
lipschitz    certified Lipschitz bounds for whole networks, layer by layer
condition    local and global condition numbers of a network (Maheshwari et al.)
influence    the first-order influence measure on a perturbation manifold (Shu & Zhu)
"""

from sensitivity_lib.profiles import PROFILES, seed_everything, setup
from sensitivity_lib.results import Estimate

__all__ = ["Estimate", "PROFILES", "seed_everything", "setup"]
__version__ = "0.1.0"
