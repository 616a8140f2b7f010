"""Part II: influence on a perturbation manifold (Shu & Zhu, AAAI 2019, arXiv:1901.07152).

The first-order influence ``FI = df^T G^+ df`` of a perturbation of an image, of its pixels, of a
layer's parameters or of all parameters on ``f = log p(y | x)``, in the Fisher-Rao metric of the
predictive distribution, computed from C x C Gram matrices.

Its modules::

    measure    FI and its diagnostics (fi, fi_maps, fi_direction), the C x C
               kernel, the authors' per-image algorithm as a reference, and the pixel-flip check
    sa_dnn     PyTorch ports of the authors' ResNet-50 and DenseNet-121 for 28x28 and 32x32 images
    outliers   the synthetic MNIST outliers of the paper's Setup 0
    cook       Cook's (1986) local influence of case weights (last layer): the classical baseline
    layers     which layers are most sensitive: the size of each layer's metric, and a check

The functions of ``measure`` are re-exported here: ``influence.fi(model, x)``; those of ``cook``
and ``layers`` are used through their modules (``influence.cook.local_influence``).
"""

from sensitivity_lib.influence.measure import (
    DEFAULT_RTOL,
    SA_DNN_EPS,
    Influence,
    fi,
    fi_direction,
    fi_from_gram,
    fi_maps,
    fi_target,
    flip_top_pixels,
    logit_grams,
    reference_loop,
    svd_chain_reference,
)

__all__ = [
    "DEFAULT_RTOL",
    "SA_DNN_EPS",
    "Influence",
    "fi",
    "fi_direction",
    "fi_from_gram",
    "fi_maps",
    "fi_target",
    "flip_top_pixels",
    "logit_grams",
    "reference_loop",
    "svd_chain_reference",
]
