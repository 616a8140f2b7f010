"""Part I, closing: from a condition number to bits, for inputs, weights, activations and arithmetic.

Maheshwari et al. (arXiv:2307.12679) exist "to determine minimal bit-width precision that may be
used to safely represent the network" (quoted). This subpackage is the one home of every rounding in
the library, and of the bit counts the book derives from condition numbers (our reconstruction).

Its modules::

    formats    number formats and every rounding: round_float (IEEE 754 significand and exponent
               range, subnormals, overflow), round_fixed (saturating fixed point), round_to_levels
               (image files), modes nearest / chop / stochastic, FORMATS (float32, tf32, float16,
               bfloat16, float8 e5m2 and e4m3fn, fixed Qi.f)
    margin     bits from a condition number and a logit gap (imports nothing else of the library)
    quantize   quantized: a copy of a model that rounds its input, weights and layer outputs
    bits       condition numbers with respect to weights and activations, predicted and measured
               bits, recommend_bits and its BitReport
    layers     per layer: measured bits, condition numbers, Hutchinson Hessian traces (HAWQ's
               ranking), SQNR in dB

Layering: ``formats``, ``margin`` and ``quantize`` do not import :mod:`sensitivity_lib.condition`
(which rounds through them); ``bits`` and ``layers`` do.
"""

from sensitivity_lib.precision.bits import (  # noqa: I001 - after formats: condition imports them
    KINDS,
    TARGETS,
    BitReport,
    activation_condition,
    measured_bits,
    predicted_bits,
    recommend_bits,
    weight_condition,
)
from sensitivity_lib.precision.formats import (
    FORMATS,
    ROUNDING_MODES,
    Format,
    as_format,
    fixed_format,
    float_format,
    round_fixed,
    round_float,
    round_to_levels,
)
from sensitivity_lib.precision.layers import hessian_trace, layer_bits, layer_condition, layer_sqnr, sqnr_db
from sensitivity_lib.precision.margin import bits_for_amplification, logit_margin, min_input_bits
from sensitivity_lib.precision.quantize import (
    Quantized,
    activation_layers,
    layer_outputs,
    quantized,
    weight_layers,
)

__all__ = [
    "FORMATS",
    "KINDS",
    "ROUNDING_MODES",
    "TARGETS",
    "BitReport",
    "Format",
    "Quantized",
    "activation_condition",
    "activation_layers",
    "as_format",
    "bits_for_amplification",
    "fixed_format",
    "float_format",
    "hessian_trace",
    "layer_bits",
    "layer_condition",
    "layer_outputs",
    "layer_sqnr",
    "logit_margin",
    "measured_bits",
    "min_input_bits",
    "predicted_bits",
    "quantized",
    "recommend_bits",
    "round_fixed",
    "round_float",
    "round_to_levels",
    "sqnr_db",
    "weight_condition",
    "weight_layers",
]
