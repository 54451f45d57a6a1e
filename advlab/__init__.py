"""advlab: composable adversarial training in embedding space for PyTorch (VILLA, FreeLB, SMART, ...).

The top level holds what a user types: the recipes, `free_training`, `attack` and
`evaluate_robustness`, `Perturbation` and `Site`, the samplers and ascenders a recipe takes,
`project` / `normalize`, the regularisers and the errors. Everything else (the engine's
classes, per-norm projections, site resolution, type aliases) is public in its own module,
e.g. `advlab.balls.project_l2`, `advlab.free.default_logits`, `advlab.sites.resolve_sites`.
"""

from advlab._errors import AdvlabError as AdvlabError
from advlab._errors import AdvlabTypeError as AdvlabTypeError
from advlab._errors import AdvlabValueError as AdvlabValueError
from advlab._errors import ContextExitedError as ContextExitedError
from advlab._errors import NonFiniteError as NonFiniteError
from advlab.ascent import PGDAscender as PGDAscender
from advlab.ascent import SMARTAscender as SMARTAscender
from advlab.attacks import AttackResult as AttackResult
from advlab.attacks import attack as attack
from advlab.attacks import evaluate_robustness as evaluate_robustness
from advlab.awp import AWP as AWP
from advlab.balls import normalize as normalize
from advlab.balls import project as project
from advlab.fast_at import FastAT as FastAT
from advlab.free import free_training as free_training
from advlab.freelb import FreeLB as FreeLB
from advlab.hooks import perturb_sites as perturb_sites
from advlab.neftune import NEFTune as NEFTune
from advlab.perturbation import Perturbation as Perturbation
from advlab.perturbation import embedding_scale as embedding_scale
from advlab.presets import PRESETS as PRESETS
from advlab.presets import get_preset as get_preset
from advlab.r3f import R3F as R3F
from advlab.r3f import spectral_norm_head as spectral_norm_head
from advlab.reference import ReferenceModel as ReferenceModel
from advlab.regularizers import JSRegularizer as JSRegularizer
from advlab.regularizers import KLRegularizer as KLRegularizer
from advlab.regularizers import SymmetricKLRegularizer as SymmetricKLRegularizer
from advlab.regularizers import js_divergence as js_divergence
from advlab.regularizers import kl_divergence as kl_divergence
from advlab.regularizers import symmetric_kl as symmetric_kl
from advlab.samplers import NormalSampler as NormalSampler
from advlab.samplers import Sampler as Sampler
from advlab.samplers import ScaledUniformSampler as ScaledUniformSampler
from advlab.samplers import SphereSampler as SphereSampler
from advlab.samplers import UniformSampler as UniformSampler
from advlab.samplers import ZeroSampler as ZeroSampler
from advlab.sites import Site as Site
from advlab.smart import SMART as SMART
from advlab.stats import StepStats as StepStats
from advlab.trades import TRADES as TRADES
from advlab.vat import VAT as VAT
from advlab.villa import VILLA as VILLA

__version__ = "0.1.0"

__all__ = [
    "AWP",
    "PRESETS",
    "R3F",
    "SMART",
    "TRADES",
    "VAT",
    "VILLA",
    "AdvlabError",
    "AdvlabTypeError",
    "AdvlabValueError",
    "AttackResult",
    "ContextExitedError",
    "FastAT",
    "FreeLB",
    "JSRegularizer",
    "KLRegularizer",
    "NEFTune",
    "NonFiniteError",
    "NormalSampler",
    "PGDAscender",
    "Perturbation",
    "ReferenceModel",
    "SMARTAscender",
    "Sampler",
    "ScaledUniformSampler",
    "Site",
    "SphereSampler",
    "StepStats",
    "SymmetricKLRegularizer",
    "UniformSampler",
    "ZeroSampler",
    "attack",
    "embedding_scale",
    "evaluate_robustness",
    "free_training",
    "get_preset",
    "js_divergence",
    "kl_divergence",
    "normalize",
    "perturb_sites",
    "project",
    "spectral_norm_head",
    "symmetric_kl",
]
