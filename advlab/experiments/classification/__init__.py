"""Caption → category classification with a pretrained encoder, trained through `AdversarialTrainer`.

The Tux Paint stamps' captions (or openclipart's) are labelled by their top-level folder and
split as in the retrieval experiment (caption level, seed 0, 70 / 10 / 20; one example per
distinct caption). The whole MiniLM-L6 is fine-tuned as `transformers.BertForSequenceClassification`
with a fresh head, through the Hugging Face Trainer: a plain `Trainer` for the baseline, advlab's
`AdversarialTrainer` with a recipe on `bert.embeddings.word_embeddings` for every other arm
(noise control, FreeLB, SMART, VILLA text-only, R3F, VAT/ALUM, TRADES, FastAT). Test accuracy,
macro-F1, accuracy under an embedding attack at several radii and on WordNet-paraphrased
captions are compared with paired per-seed differences against the baseline.

Run `python -m advlab.experiments.classification` (quick default), `--tune`, `--full` or
`--report`. Modules: `config` (arms, sizes, settings), `data` (folder → labelled, split,
tokenised captions), `model` (the classifier), `training` (one run through the Trainer),
`metrics`, `runs` (resumable records, tuning), `report` (tables, plots), `cli`.

Shape notation:
    - n: captions in a split; L: token positions; b: batch size
"""

from advlab.experiments.classification.cli import main as main
from advlab.experiments.classification.config import ARM_LABELS as ARM_LABELS
from advlab.experiments.classification.config import ARM_UNITS as ARM_UNITS
from advlab.experiments.classification.config import ARMS_FULL as ARMS_FULL
from advlab.experiments.classification.config import ARMS_QUICK as ARMS_QUICK
from advlab.experiments.classification.config import DEFAULT_SIZES as DEFAULT_SIZES
from advlab.experiments.classification.config import PUBLISHED as PUBLISHED
from advlab.experiments.classification.config import SITE as SITE
from advlab.experiments.classification.config import TUNE_GRIDS as TUNE_GRIDS
from advlab.experiments.classification.config import ClassificationConfig as ClassificationConfig
from advlab.experiments.classification.config import config_from_settings as config_from_settings
from advlab.experiments.classification.config import load_settings as load_settings
from advlab.experiments.classification.data import ClassificationData as ClassificationData
from advlab.experiments.classification.data import Split as Split
from advlab.experiments.classification.data import caption_tokenizer as caption_tokenizer
from advlab.experiments.classification.data import collate as collate
from advlab.experiments.classification.data import merge_rare as merge_rare
from advlab.experiments.classification.data import prepare_data as prepare_data
from advlab.experiments.classification.metrics import accuracy as accuracy
from advlab.experiments.classification.metrics import macro_f1 as macro_f1
from advlab.experiments.classification.metrics import robust_accuracy as robust_accuracy
from advlab.experiments.classification.model import build_model as build_model
from advlab.experiments.classification.model import embedding_scales as embedding_scales
from advlab.experiments.classification.report import paired as paired
from advlab.experiments.classification.report import results_markdown as results_markdown
from advlab.experiments.classification.report import summarize as summarize
from advlab.experiments.classification.runs import RECORD_FORMAT as RECORD_FORMAT
from advlab.experiments.classification.runs import load_records as load_records
from advlab.experiments.classification.runs import run_experiment as run_experiment
from advlab.experiments.classification.runs import tune as tune
from advlab.experiments.classification.training import build_recipe as build_recipe
from advlab.experiments.classification.training import train_run as train_run

__all__ = [
    "ARMS_FULL",
    "ARMS_QUICK",
    "ARM_LABELS",
    "ARM_UNITS",
    "DEFAULT_SIZES",
    "PUBLISHED",
    "RECORD_FORMAT",
    "SITE",
    "TUNE_GRIDS",
    "ClassificationConfig",
    "ClassificationData",
    "Split",
    "accuracy",
    "build_model",
    "build_recipe",
    "caption_tokenizer",
    "collate",
    "config_from_settings",
    "embedding_scales",
    "load_records",
    "load_settings",
    "macro_f1",
    "main",
    "merge_rare",
    "paired",
    "prepare_data",
    "results_markdown",
    "robust_accuracy",
    "run_experiment",
    "summarize",
    "train_run",
    "tune",
]
