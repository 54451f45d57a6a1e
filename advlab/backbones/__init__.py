"""Reference vision-and-language backbones: UNITER and LXMERT, with task heads, task losses and checkpoint loaders.

Each model implements `perturbation_sites()`, so `advlab.VILLA(model)` finds where to perturb.
"""

from advlab.backbones.lxmert import LxmertConfig as LxmertConfig
from advlab.backbones.lxmert import LxmertForGQA as LxmertForGQA
from advlab.backbones.lxmert import LxmertForNLVR2 as LxmertForNLVR2
from advlab.backbones.lxmert import LxmertForPreTraining as LxmertForPreTraining
from advlab.backbones.lxmert import LxmertForQuestionAnswering as LxmertForQuestionAnswering
from advlab.backbones.lxmert import LxmertForVQA as LxmertForVQA
from advlab.backbones.lxmert import LxmertModel as LxmertModel
from advlab.backbones.lxmert import remap_answer_rows as remap_answer_rows
from advlab.backbones.uniter import UniterConfig as UniterConfig
from advlab.backbones.uniter import UniterForImageTextRetrieval as UniterForImageTextRetrieval
from advlab.backbones.uniter import UniterForNLVR2 as UniterForNLVR2
from advlab.backbones.uniter import UniterForVCR as UniterForVCR
from advlab.backbones.uniter import UniterForVisualEntailment as UniterForVisualEntailment
from advlab.backbones.uniter import UniterForVQA as UniterForVQA
from advlab.backbones.uniter import UniterModel as UniterModel

__all__ = [
    "LxmertConfig",
    "LxmertForGQA",
    "LxmertForNLVR2",
    "LxmertForPreTraining",
    "LxmertForQuestionAnswering",
    "LxmertForVQA",
    "LxmertModel",
    "UniterConfig",
    "UniterForImageTextRetrieval",
    "UniterForNLVR2",
    "UniterForVCR",
    "UniterForVQA",
    "UniterForVisualEntailment",
    "UniterModel",
    "remap_answer_rows",
]
