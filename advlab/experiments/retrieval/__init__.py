"""Image–caption retrieval with UNITER-mini / LXMERT-mini: baseline vs zero-δ and noise controls vs VILLA.

The design is advlab's own (no official adversarial retrieval code exists; UNITER's retrieval used
a hinge `rank_output`). Each backbone encodes text and regions separately for an in-batch
contrastive loss (ITC) and jointly for an image–text matching head (ITM) trained with negatives
mined from the ITC similarities (as ALBEF does). Ranking: the full test gallery by ITC, then the
ITC top-k re-ranked by ITM. VILLA's KL acts on the distributions the losses use: each row of the
in-batch caption→image and image→caption softmax, and the 2-way ITM distribution.

The forward is structured so that each perturbation site runs once: the word embeddings and the
region embeddings are computed once per batch and reused by the text-only, image-only and joint
encodings (negative pairs index them), so δ is shared by all three.

Run `python -m advlab.experiments.retrieval` (quick default), `--tune`, or `--full`.

The package is split by job: `config` (arms, run settings, the settings file), `data` (folder →
split tensors), `model` (the two-stage model), `losses` (ITC, mined ITM negatives, the KL),
`metrics` (R@K, evaluation, robustness to paraphrases and PGD, the gate), `training` (one run),
`pretraining` (the in-domain pre-training stage of the `pt-*` arms: MLM, ITM, MRFR),
`runs` (every run, resumable records, tuning), `report` (tables and plots) and `cli` (the command line, run by `__main__`).

Shape notation:
    - b: batch size; L: text positions; r: regions; h: hidden width; n: captions in a split
"""

from advlab.experiments.retrieval.cli import main as main
from advlab.experiments.retrieval.config import ARM_LABELS as ARM_LABELS
from advlab.experiments.retrieval.config import ARMS_FULL as ARMS_FULL
from advlab.experiments.retrieval.config import ARMS_PRETRAIN as ARMS_PRETRAIN
from advlab.experiments.retrieval.config import ARMS_QUICK as ARMS_QUICK
from advlab.experiments.retrieval.config import CONTROLS as CONTROLS
from advlab.experiments.retrieval.config import FULL_PLAN as FULL_PLAN
from advlab.experiments.retrieval.config import SETTINGS_PATH as SETTINGS_PATH
from advlab.experiments.retrieval.config import Arm as Arm
from advlab.experiments.retrieval.config import Backbone as Backbone
from advlab.experiments.retrieval.config import RetrievalConfig as RetrievalConfig
from advlab.experiments.retrieval.config import configs_from_settings as configs_from_settings
from advlab.experiments.retrieval.config import load_settings as load_settings
from advlab.experiments.retrieval.data import RetrievalData as RetrievalData
from advlab.experiments.retrieval.data import SplitTensors as SplitTensors
from advlab.experiments.retrieval.data import prepare_data as prepare_data
from advlab.experiments.retrieval.losses import itc_loss as itc_loss
from advlab.experiments.retrieval.metrics import ParaphrasedCaptions as ParaphrasedCaptions
from advlab.experiments.retrieval.metrics import RobustnessSpec as RobustnessSpec
from advlab.experiments.retrieval.metrics import check_gate as check_gate
from advlab.experiments.retrieval.metrics import evaluate as evaluate
from advlab.experiments.retrieval.metrics import evaluate_robustness as evaluate_robustness
from advlab.experiments.retrieval.metrics import folder_robustness_spec as folder_robustness_spec
from advlab.experiments.retrieval.metrics import paraphrase_split as paraphrase_split
from advlab.experiments.retrieval.metrics import recall_at_k as recall_at_k
from advlab.experiments.retrieval.metrics import rerank_scores as rerank_scores
from advlab.experiments.retrieval.model import RetrievalModel as RetrievalModel
from advlab.experiments.retrieval.model import build_model as build_model
from advlab.experiments.retrieval.model import pool_grid as pool_grid
from advlab.experiments.retrieval.pretraining import pretrain_run as pretrain_run
from advlab.experiments.retrieval.report import draw_curves as draw_curves
from advlab.experiments.retrieval.report import draw_plot as draw_plot
from advlab.experiments.retrieval.report import draw_robustness as draw_robustness
from advlab.experiments.retrieval.report import draw_tuning as draw_tuning
from advlab.experiments.retrieval.report import paired_lines as paired_lines
from advlab.experiments.retrieval.report import pretrain_lines as pretrain_lines
from advlab.experiments.retrieval.report import results_markdown as results_markdown
from advlab.experiments.retrieval.report import robustness_lines as robustness_lines
from advlab.experiments.retrieval.report import summarize as summarize
from advlab.experiments.retrieval.report import tuning_table as tuning_table
from advlab.experiments.retrieval.report import verdict_lines as verdict_lines
from advlab.experiments.retrieval.runs import RECORD_FORMAT as RECORD_FORMAT
from advlab.experiments.retrieval.runs import TUNE_KL_WEIGHTS as TUNE_KL_WEIGHTS
from advlab.experiments.retrieval.runs import TUNE_SIZES as TUNE_SIZES
from advlab.experiments.retrieval.runs import GateError as GateError
from advlab.experiments.retrieval.runs import best_epoch as best_epoch
from advlab.experiments.retrieval.runs import load_records as load_records
from advlab.experiments.retrieval.runs import run_experiment as run_experiment
from advlab.experiments.retrieval.runs import tune as tune
from advlab.experiments.retrieval.training import train_run as train_run

__all__ = [
    "ARMS_FULL",
    "ARMS_PRETRAIN",
    "ARMS_QUICK",
    "ARM_LABELS",
    "CONTROLS",
    "FULL_PLAN",
    "RECORD_FORMAT",
    "SETTINGS_PATH",
    "TUNE_KL_WEIGHTS",
    "TUNE_SIZES",
    "Arm",
    "Backbone",
    "GateError",
    "ParaphrasedCaptions",
    "RetrievalConfig",
    "RetrievalData",
    "RetrievalModel",
    "RobustnessSpec",
    "SplitTensors",
    "best_epoch",
    "build_model",
    "check_gate",
    "configs_from_settings",
    "draw_curves",
    "draw_plot",
    "draw_robustness",
    "draw_tuning",
    "evaluate",
    "evaluate_robustness",
    "folder_robustness_spec",
    "itc_loss",
    "load_records",
    "load_settings",
    "main",
    "paired_lines",
    "paraphrase_split",
    "pool_grid",
    "prepare_data",
    "pretrain_lines",
    "pretrain_run",
    "recall_at_k",
    "rerank_scores",
    "results_markdown",
    "robustness_lines",
    "run_experiment",
    "summarize",
    "train_run",
    "tune",
    "tuning_table",
    "verdict_lines",
]
