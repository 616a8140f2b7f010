"""sensitivity_lib: the library under the book *Sensitivity of Deep Neural Networks*.

The map of the package::

    The shared numerical core (one module per job, used by every part)
        results      Estimate: a number and whether it is exact, a certified bound or an estimate
        validation   input checks, the one eval-mode policy, model fingerprints
        krylov       LinearOperator, and Lanczos / power iterations for the top of a spectrum, with one
                     stopping rule and loud non-convergence; MINRES / LSQR solves (scipy) on it
        graph        the traced-graph walker: a model reduced to steps, one rule per operation
        opnorm       operator norms of conv and linear layers (exact, certified upper, lower)
        winograd     Winograd's F(4x4, 3x3) for the 3x3 convolutions inside those iterations
        search       the smallest change that flips a prediction (bisection or scan)
        attacks      adapters to adversarial-robustness-toolbox and foolbox: FGSM / PGD at a budget,
                     minimal perturbations (DeepFool, Carlini-Wagner, DDN, FGSM / PGD with a flip search)
        shards       per-sample measurements over several processes (torchrun), gathered on rank 0
        pseudospectra  sigma_min(zI - A) on a grid (Schur + batched inverse Lanczos), pseudospectral
                     radius and abscissa, Kreiss constant, departures from normality, transient growth
    Part I      condition/   a condition number for a whole network (Maheshwari et al.)
                precision/   from a condition number to bits: number formats and every rounding,
                             quantized models, predicted and measured bits for inputs, weights and
                             activations, per-layer rankings (condition, Hessian trace, SQNR)
    Part II     influence/   influence on a perturbation manifold (Shu & Zhu)
    Part III    recurrent/   recurrent networks: normalised spectra, robustness (Sengupta & Friston)
    Part IV     setvalued/   set-valued sensitivity of training: graphical derivative, Lipschitz
                             modulus, distances of sets (Wang, Wang & Ban)
    Closing     report       the Part I measures of any classifier side by side: value, kind, cost
    Book support
        data         datasets in [0, 1] pixel space: what ships offline, loaders for what you supply
        zoo          the model wrapper (normalisation inside), pretrained loaders, deterministic training
        plotting     one figure style and helpers that draw on a given ``ax``
        profiles     the PROFILE switch (quick / book / full) and a reproducible start for every chapter

No module imports another's private (underscore) names; a subpackage's ``_`` modules are its own.
"""

from sensitivity_lib.profiles import PROFILES, glue_all, seed_everything, setup
from sensitivity_lib.results import Estimate

__all__ = ["Estimate", "PROFILES", "glue_all", "seed_everything", "setup"]
__version__ = "0.1.0"
