"""Part IV: set-valued sensitivity of training (Wang, Wang & Ban, AAAI 2025, arXiv:2412.11057).

When the data of a training problem move, its minimisers move as a *set*: the Hessian of a deep
network's loss is singular, the solution map ``S(x)`` is set-valued, and the influence function
(``-H^{-1} b``, Koh & Liang 2017) is its single-valued special case. This subpackage computes the
graphical derivative of the (stationarity) solution map, the estimate ``w + DS(x | w)(dx)`` of the
perturbed solutions, the Lipschitz modulus ``||H^+ R_x||`` of the Aubin property, Theorem 2's closed
form for bias-free ReLU networks, and distances between sampled sets. Everything is float64; the
Hessian is used through Hessian-vector products (torch.func), or densely for small models.

Its modules::

    problem     loss(w, x) from an nn.Module, a data set and a per-sample loss (module_loss,
                squared_error); L-BFGS training to stationarity (fit); the Hessian and the mixed
                derivative as matrix-free operators, the dense Hessian spectrum for small models
                (hessian_spectrum)
    derivative  the graphical derivative as an affine set (graphical_derivative, AffineSet):
                dense eigendecomposition, or MINRES / LSQR on HVPs
    modulus     the Lipschitz modulus ||H^+ R_x||_2 with the Mordukhovich criterion checked
                (lipschitz_modulus), and Theorem 2's kappa_h (theorem2_kappa)
    distances   point-to-set distance, excess and Pompeiu-Hausdorff distance of sampled sets
                (distance, excess, hausdorff)

The public names of every module are re-exported here: ``setvalued.graphical_derivative(...)``.
"""

from sensitivity_lib.setvalued.derivative import METHODS, AffineSet, graphical_derivative
from sensitivity_lib.setvalued.distances import distance, excess, hausdorff
from sensitivity_lib.setvalued.modulus import CriterionWarning, lipschitz_modulus, relu_layers, theorem2_kappa
from sensitivity_lib.setvalued.problem import (
    REDUCTIONS,
    FitResult,
    Spectrum,
    TrainingLoss,
    fit,
    hessian_operator,
    hessian_spectrum,
    mixed_operator,
    mixed_term,
    module_loss,
    squared_error,
)

__all__ = [
    "METHODS",
    "REDUCTIONS",
    "AffineSet",
    "CriterionWarning",
    "FitResult",
    "Spectrum",
    "TrainingLoss",
    "distance",
    "excess",
    "fit",
    "graphical_derivative",
    "hausdorff",
    "hessian_operator",
    "hessian_spectrum",
    "lipschitz_modulus",
    "mixed_term",
    "mixed_operator",
    "module_loss",
    "relu_layers",
    "squared_error",
    "theorem2_kappa",
]
