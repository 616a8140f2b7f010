"""Part III: recurrent networks, spectra and pseudospectra (Sengupta & Friston, arXiv:1804.11313).

Its modules::

    models       Elman, LSTM and GRU classifiers with readable, normalisable recurrent blocks
                 (spectral radius by block power iteration, largest singular value, orthogonal), the
                 spectral-radius estimators, hidden states and (unrolled) state Jacobians
    tasks        the three offline sequence tasks and the cached, deterministic training
    robustness   accuracy under noise, FGSM/PGD, minimal flipping budgets, state amplification, E0
                 against the sequence length

The pseudospectra themselves are :mod:`sensitivity_lib.pseudospectra` (a core module: they apply
to any square matrix). The functions are re-exported here: ``recurrent.train(recipe)``.
"""

from sensitivity_lib.recurrent.models import (
    CELLS,
    GATES,
    NORMALISATIONS,
    RecurrentClassifier,
    SpectralNormPower,
    SpectralRadiusNorm,
    finalise,
    hidden_states,
    spectral_radius,
    state_jacobian,
    state_jacobians,
)
from sensitivity_lib.recurrent.robustness import (
    attack_accuracy,
    condition_vs_length,
    fgsm,
    minimal_flip,
    noise_accuracy,
    pgd,
    state_amplification,
    unrolled_norm,
)
from sensitivity_lib.recurrent.tasks import (
    TASKS,
    SeqData,
    SeqRecipe,
    SeqReport,
    accuracy,
    adding_problem,
    as_rows,
    build,
    task_data,
    train,
)

__all__ = [
    "CELLS", "GATES", "NORMALISATIONS", "RecurrentClassifier", "SpectralNormPower",
    "SpectralRadiusNorm", "finalise", "hidden_states", "spectral_radius", "state_jacobian",
    "state_jacobians", "attack_accuracy", "condition_vs_length", "fgsm", "minimal_flip",
    "noise_accuracy", "pgd", "state_amplification", "unrolled_norm", "TASKS", "SeqData",
    "SeqRecipe", "SeqReport", "accuracy", "adding_problem", "as_rows", "build", "task_data", "train",
]  # fmt: skip
