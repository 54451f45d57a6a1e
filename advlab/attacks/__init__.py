"""Robustness evaluation: attacks in embedding space at the same sites adversarial training perturbs.

- `attack`: the per-example worst-case loss of one batch under PGD or APGD, with restarts.
- `evaluate_robustness`: a metric under attack over a data loader, for a list of radii.
- `attack_retrieval`: the query side of a ranking, and robust Recall@K.
"""

from advlab.attacks.apgd import apgd_checkpoints as apgd_checkpoints
from advlab.attacks.core import Method as Method
from advlab.attacks.core import attack as attack
from advlab.attacks.evaluate import RobustnessTable as RobustnessTable
from advlab.attacks.evaluate import accuracy as accuracy
from advlab.attacks.evaluate import evaluate_robustness as evaluate_robustness
from advlab.attacks.result import AttackResult as AttackResult
from advlab.attacks.retrieval import RetrievalAttackResult as RetrievalAttackResult
from advlab.attacks.retrieval import Similarity as Similarity
from advlab.attacks.retrieval import attack_retrieval as attack_retrieval
from advlab.attacks.retrieval import recall_from_ranks as recall_from_ranks

__all__ = [
    "AttackResult",
    "Method",
    "RetrievalAttackResult",
    "RobustnessTable",
    "Similarity",
    "accuracy",
    "apgd_checkpoints",
    "attack",
    "attack_retrieval",
    "evaluate_robustness",
    "recall_from_ranks",
]
