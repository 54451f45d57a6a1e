"""advlab: composable adversarial training in embedding space for PyTorch."""

from advlab._errors import AdvlabError as AdvlabError
from advlab._errors import AdvlabTypeError as AdvlabTypeError
from advlab._errors import AdvlabValueError as AdvlabValueError
from advlab._errors import ContextExitedError as ContextExitedError
from advlab._errors import NonFiniteError as NonFiniteError
from advlab.sites import HasPerturbationSites as HasPerturbationSites
from advlab.sites import Site as Site
from advlab.sites import resolve_sites as resolve_sites
from advlab.sites import unwrap_model as unwrap_model

__all__ = [
    "AdvlabError",
    "AdvlabTypeError",
    "AdvlabValueError",
    "ContextExitedError",
    "NonFiniteError",
    "HasPerturbationSites",
    "Site",
    "resolve_sites",
    "unwrap_model",
]
