"""Part I: a condition number for a whole network (Maheshwari et al., arXiv:2307.12679).

The relative condition number ``kappa(x) = ||J(x)|| ||x|| / ||f(x)||`` of a network at an input, in
the 2-norm, on the model's input space ([0, 1] pixels for the book's models), and what it predicts.

Its modules::

    lipschitz     E1: the certified Lipschitz bound of a whole network, and its per-layer factors
    local         E0: the exact local condition number (Lanczos on J J^T); E2: the local masked
                  product; Skeel's componentwise condition number; where the network is not
                  differentiable
    approximate   E3: E1 with cheap layer norms (the paper's "approximation of the estimator")
    perturbation  random and gradient directions, observed amplification, the smallest flipping step
    peers         other per-image robustness scores (CLEVER, through adversarial-robustness-toolbox)
    radius        distances to the decision boundary the condition numbers predict: the certified
                  radius g / (sqrt(2) L) (a lower bound) and the first-order radius (DeepFool's
                  first step)
    tightness     every per-image measurement of the chapter on tightness at the decision,
                  shardable over processes (``condition.tightness.measure``, ``measure_sharded``)

Rounding, number formats and the bit counts these condition numbers predict live in
:mod:`sensitivity_lib.precision` (Part I's closing chapter).

The functions are re-exported here (``condition.local_condition(model, x)``), except the tightness
module's, which are used through it (``condition.tightness.measure``).
"""

from sensitivity_lib.condition import tightness
from sensitivity_lib.condition.approximate import APPROXIMATIONS, approximate_condition
from sensitivity_lib.condition.lipschitz import (
    certified_layer_norm,
    global_condition,
    layerwise_condition,
    linear_norm_upper,
    lipschitz_bound,
    lipschitz_product,
)
from sensitivity_lib.condition.local import (
    componentwise_condition,
    jacobian_norm,
    jacobian_operator,
    kink_fractions,
    local_condition,
    masked_product_condition,
)
from sensitivity_lib.condition.peers import clever_l2
from sensitivity_lib.condition.perturbation import (
    NOISE_KINDS,
    amplification,
    gradient_direction,
    max_amplification,
    random_directions,
    rounding_flip_bits,
    smallest_flip,
)
from sensitivity_lib.condition.radius import certified_radius, first_order_radius, logit_gap

__all__ = [
    "APPROXIMATIONS",
    "NOISE_KINDS",
    "amplification",
    "approximate_condition",
    "certified_layer_norm",
    "certified_radius",
    "clever_l2",
    "componentwise_condition",
    "first_order_radius",
    "global_condition",
    "gradient_direction",
    "jacobian_norm",
    "jacobian_operator",
    "kink_fractions",
    "layerwise_condition",
    "linear_norm_upper",
    "lipschitz_bound",
    "lipschitz_product",
    "local_condition",
    "logit_gap",
    "masked_product_condition",
    "max_amplification",
    "random_directions",
    "rounding_flip_bits",
    "smallest_flip",
    "tightness",
]
