"""advlab: composable adversarial training in embedding space for PyTorch (VILLA, FreeLB, SMART)."""

from advlab._errors import AdvlabError as AdvlabError
from advlab._errors import AdvlabTypeError as AdvlabTypeError
from advlab._errors import AdvlabValueError as AdvlabValueError
from advlab._errors import ContextExitedError as ContextExitedError
from advlab._errors import NonFiniteError as NonFiniteError
from advlab.ascent import Direction as Direction
from advlab.ascent import PGDAscender as PGDAscender
from advlab.ascent import SMARTAscender as SMARTAscender
from advlab.ascent import pgd_step as pgd_step
from advlab.ascent import random_direction as random_direction
from advlab.ascent import smart_step as smart_step
from advlab.attacks import AttackResult as AttackResult
from advlab.attacks import attack as attack
from advlab.attacks import evaluate_robustness as evaluate_robustness
from advlab.awp import AWP as AWP
from advlab.balls import Ball as Ball
from advlab.balls import Norm as Norm
from advlab.balls import normalize as normalize
from advlab.balls import normalize_l2 as normalize_l2
from advlab.balls import normalize_l2_token as normalize_l2_token
from advlab.balls import normalize_linf as normalize_linf
from advlab.balls import normalize_sign as normalize_sign
from advlab.balls import project as project
from advlab.balls import project_l2 as project_l2
from advlab.balls import project_l2_token as project_l2_token
from advlab.balls import project_linf as project_linf
from advlab.balls import row_norm as row_norm
from advlab.fast_at import FastAT as FastAT
from advlab.free import Ascender as Ascender
from advlab.free import AscentStep as AscentStep
from advlab.free import FreeTraining as FreeTraining
from advlab.free import default_logits as default_logits
from advlab.free import forward_groups as forward_groups
from advlab.free import free_training as free_training
from advlab.freelb import FreeLB as FreeLB
from advlab.hooks import perturb_sites as perturb_sites
from advlab.neftune import NEFTune as NEFTune
from advlab.perturbation import Perturbation as Perturbation
from advlab.perturbation import embedding_scale as embedding_scale
from advlab.presets import PRESETS as PRESETS
from advlab.presets import VillaPreset as VillaPreset
from advlab.presets import get_preset as get_preset
from advlab.r3f import R3F as R3F
from advlab.r3f import spectral_norm_head as spectral_norm_head
from advlab.reference import ReferenceModel as ReferenceModel
from advlab.regularizers import Distribution as Distribution
from advlab.regularizers import JSRegularizer as JSRegularizer
from advlab.regularizers import KLRegularizer as KLRegularizer
from advlab.regularizers import Reduction as Reduction
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
from advlab.sites import HasPerturbationSites as HasPerturbationSites
from advlab.sites import ResolvedSites as ResolvedSites
from advlab.sites import Site as Site
from advlab.sites import resolve_sites as resolve_sites
from advlab.sites import unwrap_model as unwrap_model
from advlab.smart import SMART as SMART
from advlab.stats import StepStats as StepStats
from advlab.trades import TRADES as TRADES
from advlab.vat import VAT as VAT
from advlab.villa import VILLA as VILLA

__version__ = "0.1.0"

__all__ = [
    "AdvlabError",
    "AdvlabTypeError",
    "AdvlabValueError",
    "ContextExitedError",
    "NonFiniteError",
    "attack",
    "AttackResult",
    "evaluate_robustness",
    "Direction",
    "pgd_step",
    "random_direction",
    "smart_step",
    "PGDAscender",
    "SMARTAscender",
    "Norm",
    "Ball",
    "row_norm",
    "normalize",
    "normalize_l2",
    "normalize_l2_token",
    "normalize_linf",
    "normalize_sign",
    "project",
    "project_l2",
    "project_l2_token",
    "project_linf",
    "free_training",
    "FreeTraining",
    "AscentStep",
    "Ascender",
    "default_logits",
    "forward_groups",
    "FreeLB",
    "perturb_sites",
    "Perturbation",
    "embedding_scale",
    "VillaPreset",
    "PRESETS",
    "get_preset",
    "Reduction",
    "Distribution",
    "kl_divergence",
    "symmetric_kl",
    "js_divergence",
    "KLRegularizer",
    "SymmetricKLRegularizer",
    "JSRegularizer",
    "Sampler",
    "ZeroSampler",
    "ScaledUniformSampler",
    "UniformSampler",
    "NormalSampler",
    "SphereSampler",
    "HasPerturbationSites",
    "ResolvedSites",
    "Site",
    "resolve_sites",
    "unwrap_model",
    "SMART",
    "StepStats",
    "VILLA",
    "R3F",
    "spectral_norm_head",
    "NEFTune",
    "TRADES",
    "VAT",
    "FastAT",
    "ReferenceModel",
    "AWP",
]
