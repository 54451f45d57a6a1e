"""Robustness columns of the retrieval experiment: paraphrased captions, PGD at several radii, records, report."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from advlab._errors import AdvlabValueError
from advlab.attacks.retrieval import attack_retrieval
from advlab.experiments import retrieval as R
from advlab.experiments.retrieval import runs
from advlab.experiments.retrieval.metrics import (
    RobustnessSpec,
    attack_robustness,
    paraphrase_robustness,
    paraphrase_split,
    robustness_spec,
    split_captions,
    split_ranks,
)
from advlab.experiments.retrieval.report import draw_robustness, robustness_lines
from advlab.perturbation import Perturbation
from tests.test_retrieval import TINY, WORDS, _tokenizer, make_data, make_folder, tiny_config


class Same:
    """A paraphraser that changes nothing."""

    def paraphrase_all(self, captions: list[str]) -> list[SimpleNamespace]:
        return [SimpleNamespace(text=c, substitutions=()) for c in captions]


class Swap:
    """Replaces 'cat' with 'dog' and 'red' with 'blue' (words the tiny tokenizer knows), listing what it did."""

    def paraphrase_all(self, captions: list[str]) -> list[SimpleNamespace]:
        out = []
        for c in captions:
            subs = tuple((a, b) for a, b in (("cat", "dog"), ("red", "blue")) if a in c.split() or a + "." in c.split())
            text = c
            for a, b in subs:
                text = text.replace(a, b)
            out.append(SimpleNamespace(text=text, substitutions=subs))
        return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="module")
def data(folder: Path) -> R.RetrievalData:
    return make_data(folder)


@pytest.fixture(scope="module")
def trained(data: R.RetrievalData) -> tuple[R.RetrievalModel, R.RetrievalConfig]:
    cfg = tiny_config(epochs=4, itm_weight=0.0)
    model = R.build_model("uniter", cfg, data, seed=0, text_size=TINY)
    R.train_run(model, data, "baseline", cfg, seed=0, progress=False)
    return model, cfg


def test_radius_zero_is_clean_r1_exactly(trained: tuple[R.RetrievalModel, R.RetrievalConfig],
                                         data: R.RetrievalData) -> None:
    model, cfg = trained
    out = attack_robustness(model, data.train, cfg, RobustnessSpec(text_radii=(0.0, 0.5), image_radii=(0.0, 0.5)))
    clean = R.evaluate(model, data.train, cfg)
    assert clean["itc_ir_r1"] > 0 and clean["itc_tr_r1"] > 0  # something to lose
    assert out["txt"]["r1"][0] == out["txt"]["clean_r1"] == clean["itc_ir_r1"]
    assert out["img"]["r1"][0] == out["img"]["clean_r1"] == clean["itc_tr_r1"]
    assert out["txt"]["attacked"][0] == round(clean["itc_ir_r1"] * len(data.train))  # only the queries ranked first
    assert out["txt"]["task"] == "ir" and out["img"]["task"] == "tr"


def test_robust_r1_is_the_worst_case_over_smaller_radii_and_falls(
    trained: tuple[R.RetrievalModel, R.RetrievalConfig], data: R.RetrievalData
) -> None:
    model, cfg = trained
    radii = (0.1, 0.5, 2.0)
    spec = RobustnessSpec(text_radii=radii, image_radii=radii, steps=5)
    out = attack_robustness(model, data.train, cfg, spec)
    split, n = data.train, len(data.train)
    with torch.no_grad():
        model.eval()
        text = model.encode_text(split.input_ids, split.attention_mask).itc
        image = model.encode_image(split.features, split.boxes).itc
        model.train()
    sites = model.perturbation_sites()
    for modality, gallery, forward in (
        ("txt", image, lambda: model.encode_text(split.input_ids, split.attention_mask)),
        ("img", text, lambda: model.encode_image(split.features, split.boxes)),
    ):
        # by hand: every query attacked at each radius with the documented settings, then the worst rank so far
        worst, expected = None, []
        for r in radii:
            res = attack_retrieval(
                model, sites={modality: sites[modality]}, forward=forward, embed=lambda e: e.itc, gallery=gallery,
                targets=torch.arange(n), perturbations={modality: Perturbation(2.5 * r / 5, radius=r, relative=True)},
                temperature=cfg.temperature, steps=5,
                masks={"txt": split.attention_mask} if modality == "txt" else None,
            )
            worst = torch.maximum(res.clean_ranks, res.ranks) if worst is None else torch.maximum(worst, res.ranks)
            expected.append(int((worst == 0).sum()) / n)
        side = out[modality]
        assert side["r1"] == expected
        assert all(a >= b for a, b in zip([side["clean_r1"], *side["r1"]], side["r1"]))  # non-increasing
        assert side["r1"][-1] < side["clean_r1"]  # twice the row's norm moves some query off first place


def test_spec_validation_and_keys() -> None:
    with pytest.raises(AdvlabValueError, match="text_radii"):
        RobustnessSpec(text_radii=(0.1, -0.2))
    with pytest.raises(AdvlabValueError, match="image_radii"):
        RobustnessSpec(image_radii=(0.1, 0.1))
    with pytest.raises(AdvlabValueError, match="steps"):
        RobustnessSpec(steps=0)
    with pytest.raises(AdvlabValueError, match="step_factor"):
        RobustnessSpec(step_factor=float("nan"))
    assert RobustnessSpec().attack_key == RobustnessSpec().attack_key != RobustnessSpec(steps=11).attack_key
    assert RobustnessSpec(text_radii=(0.2, 0.1)).text_radii == (0.1, 0.2)


def test_paraphraser_that_changes_nothing_gives_the_original_r1(
    trained: tuple[R.RetrievalModel, R.RetrievalConfig], data: R.RetrievalData, folder: Path
) -> None:
    model, cfg = trained
    caps = split_captions(folder, "train")
    para = paraphrase_split(data.train, caps, paraphraser=Same(), tokenizer=_tokenizer)
    assert torch.equal(para.input_ids, data.train.input_ids) and para.n_changed == 0
    out = paraphrase_robustness(model, data.train, cfg, para)
    assert out["paraphrased"] == out["original"]
    ev = R.evaluate(model, data.train, cfg)
    assert out["original"] == {"ir_r1": ev["ir_r1"], "tr_r1": ev["tr_r1"], "r1": ev["r1"]}
    assert out["n_changed"] == 0 and out["original_changed"] is None and out["share_changed"] == 0.0


def test_paraphrased_r1_is_r1_on_the_rewritten_split(
    trained: tuple[R.RetrievalModel, R.RetrievalConfig], data: R.RetrievalData, folder: Path
) -> None:
    model, cfg = trained
    caps = split_captions(folder, "train")
    para = paraphrase_split(data.train, caps, paraphraser=Swap(), tokenizer=_tokenizer)
    touched = ["cat" in c or "red" in c for c in caps]
    assert para.changed.tolist() == touched and 0 < para.n_changed < len(caps)
    assert torch.equal(para.input_ids[~para.changed], data.train.input_ids[~para.changed])  # others unchanged
    # independent: tokenise the rewritten captions and evaluate that split directly
    rewritten = [c.replace("cat", "dog").replace("red", "blue") for c in caps]
    ids, mask = _tokenizer(rewritten)
    direct = replace(data.train, input_ids=ids, attention_mask=mask)
    ev = R.evaluate(model, direct, cfg)
    out = paraphrase_robustness(model, data.train, cfg, para)
    assert out["paraphrased"] == {"ir_r1": ev["ir_r1"], "tr_r1": ev["tr_r1"], "r1": ev["r1"]}
    ranks = split_ranks(model, direct, cfg)
    rows = torch.tensor(touched)
    assert out["paraphrased_changed"]["ir_r1"] == int((ranks["ir"][rows] == 0).sum()) / sum(touched)
    assert out["paraphrased_changed"]["tr_r1"] == int((ranks["tr"][rows] == 0).sum()) / sum(touched)
    assert out["n_substituted"] == out["n_changed"] == sum(touched)
    assert para.substitutions[caps.index(next(c for c in caps if "red" in c))][-1] == ("red", "blue")


def test_paraphrase_split_refuses_mismatches(data: R.RetrievalData, folder: Path) -> None:
    caps = split_captions(folder, "train")
    with pytest.raises(AdvlabValueError, match="one caption per row"):
        paraphrase_split(data.train, caps[:-1], paraphraser=Same(), tokenizer=_tokenizer)
    with pytest.raises(AdvlabValueError, match="not the split's captions"):
        paraphrase_split(data.train, caps[::-1], paraphraser=Same(), tokenizer=_tokenizer)

    class Short:
        def paraphrase_all(self, captions: list[str]) -> list[Any]:
            return Same().paraphrase_all(captions)[1:]

    with pytest.raises(AdvlabValueError, match="results, one per caption"):
        paraphrase_split(data.train, caps, paraphraser=Short(), tokenizer=_tokenizer)


def _missing_wordnet_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: R.RetrievalData,
                          caps: list[str]) -> tuple[RobustnessSpec, str]:
    """The spec the command line builds when WordNet is not set up, and the message expected in it."""
    try:
        from advlab.data.paraphrase import WordNetParaphraser
    except ImportError:  # the paraphrase module itself is missing: the import error is the reason
        monkeypatch.setitem(sys.modules, "advlab.data.paraphrase", None)
        return robustness_spec(data.test, caps, _tokenizer), "advlab.data.paraphrase"
    monkeypatch.setenv("ADVLAB_CACHE", str(tmp_path / "empty-cache"))
    return robustness_spec(data.test, caps, _tokenizer,
                           paraphraser=lambda: WordNetParaphraser(root=tmp_path / "no-wordnet")), "setup_data.sh"


def test_missing_wordnet_leaves_the_column_out_and_the_run_finishes(
    data: R.RetrievalData, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, expected = _missing_wordnet_spec(tmp_path, monkeypatch, data, split_captions(folder, "test"))
    assert spec.paraphrased is None and expected in (spec.paraphrase_missing or "")
    lines: list[str] = []
    recs = R.run_experiment(data, arms=("baseline",), seeds=(0,), configs={"uniter": tiny_config(itm_weight=0.0)},
                            out_dir=tmp_path / "out", text_size=TINY, progress=False, log=lines.append,
                            gate_factor=0.0, robustness=spec)
    assert any("no paraphrase column" in line and expected in line for line in lines)
    block = recs[0]["robustness"]["last"]
    assert block["paraphrase"] == {"missing": spec.paraphrase_missing} and block["attack"]["txt"]["r1"]
    text = R.summarize(recs)
    assert f"No paraphrase column: {spec.paraphrase_missing}" in text and "Attack robustness" in text


@pytest.mark.slow
def test_records_carry_robustness_and_resume(data: R.RetrievalData, folder: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(epochs=3, itm_weight=0.0)
    spec = robustness_spec(data.test, split_captions(folder, "test"), _tokenizer, paraphraser=Swap(),
                           text_radii=(0.1, 1.0), image_radii=(0.1, 1.0), steps=3)
    assert spec.paraphrased is not None
    kw: dict[str, Any] = {"arms": ("baseline", "villa"), "seeds": (0,), "configs": {"uniter": cfg}, "out_dir": tmp_path,
                          "text_size": TINY, "progress": False, "log": lambda s: None, "gate_factor": 0.0,
                          "save_weights": True}
    first = R.run_experiment(data, robustness=spec, **kw)
    for rec in first:
        rob = rec["robustness"]
        assert rob["computed"] == "after training" and rob["best_epoch"] == rec["best_epoch"]
        # the paraphrase block's original R@1 is the record's test R@1: at the last epoch, and at the best one
        assert rob["last"]["paraphrase"]["original"]["r1"] == rec["test"]["r1"]
        assert rob["best"]["paraphrase"]["original"]["r1"] == rec["test_at_best"]["r1"]
        assert rob["last"]["attack"]["txt"]["clean_r1"] == rec["test"]["itc_ir_r1"]
        assert rob["best"]["attack"]["img"]["clean_r1"] == rec["test_at_best"]["itc_tr_r1"]
    text = R.summarize(first)
    for col in ("paraphrased", "txt 0.1", "img 1", "paired per-seed differences against the baseline"):
        assert col in text
    assert ("chg. drop" in text) == (spec.paraphrased.n_changed > 0)  # columns over the changed captions, if any
    md = R.results_markdown(first)
    assert "| backbone | arm | seeds | original | paraphrased | drop |" in md and "| txt clean | txt 0.1 |" in md
    assert Image.open(draw_robustness(first, tmp_path / "robustness.png")).size[0] > 500

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(runs, "train_run", boom)
    again = R.run_experiment(data, robustness=spec, **kw)
    assert all(r["resumed"] and "robustness_added" not in r for r in again)
    assert [r["robustness"] for r in again] == [r["robustness"] for r in first]

    # a record without the block gets it from the saved weights (last and, if kept, best), numbers unchanged
    path = tmp_path / "uniter-villa-seed0.json"
    stored = json.loads(path.read_text())
    old = stored.pop("robustness")
    path.write_text(json.dumps(stored))
    redone = {r["arm"]: r for r in R.run_experiment(data, robustness=spec, **kw)}["villa"]
    new = redone["robustness"]
    assert new["computed"] == "from the saved weights" and redone["resumed"] and redone["robustness_added"]
    assert "robustness_added" not in json.loads(path.read_text())
    for measure in ("last", "best"):
        for part in ("attack", "paraphrase"):
            assert new[measure][part] == old[measure][part]
    assert json.loads(path.read_text())["robustness"]["last"] == new["last"]  # written back

    # other radii: computed again from the weights; without weights the run is trained again
    wider = replace(spec, text_radii=(0.1, 0.5, 1.0))
    assert spec.complete(new["last"]) and not wider.complete(new["last"])
    calls: list[str] = []
    real = R.train_run

    def counting(model: R.RetrievalModel, d: R.RetrievalData, arm: str, *a: object, **k: object) -> list[float]:
        calls.append(arm)
        return real(model, d, arm, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(runs, "train_run", counting)
    recs = R.run_experiment(data, robustness=wider, **kw)
    assert calls == [] and all(len(r["robustness"]["last"]["attack"]["txt"]["r1"]) == 3 for r in recs)
    (tmp_path / "uniter-baseline-seed0.pt").unlink()
    stored = json.loads((tmp_path / "uniter-baseline-seed0.json").read_text())
    stored.pop("robustness")
    (tmp_path / "uniter-baseline-seed0.json").write_text(json.dumps(stored))
    kw["save_weights"] = False
    recs = R.run_experiment(data, robustness=wider, **kw)
    assert calls == ["baseline"] and not recs[0]["resumed"] and "robustness" in recs[0]


def test_report_without_robustness_is_unchanged() -> None:
    rec = lambda arm, s, v: {"backbone": "uniter", "arm": arm, "seed": s, "val": {"r1": v},
                             "test": {k: v for k in ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r1")}}
    records = [rec("baseline", 0, 0.1), rec("villa", 0, 0.2)]
    assert robustness_lines(records) == []
    assert "robust" not in R.summarize(records).lower()
    assert len(WORDS) > 0


@settings(max_examples=25, deadline=None)
@given(
    captions=st.lists(st.lists(st.sampled_from(WORDS[:-1]), min_size=1, max_size=5), min_size=1, max_size=6),
    swap=st.dictionaries(st.sampled_from(WORDS[:-1]), st.sampled_from(WORDS), max_size=4),
)
def test_paraphrase_split_keeps_unsubstituted_rows_and_marks_changed_inputs(
    captions: list[list[str]], swap: dict[str, str]
) -> None:
    texts = [" ".join(words) for words in captions]

    class Drawn:
        def paraphrase_all(self, caps: list[str]) -> list[SimpleNamespace]:
            out = []
            for c in caps:
                subs = tuple((w, swap[w]) for w in c.split() if w in swap)
                out.append(SimpleNamespace(text=" ".join(swap.get(w, w) for w in c.split()), substitutions=subs))
            return out

    ids, mask = _tokenizer(texts)
    split = R.SplitTensors(ids, mask, torch.zeros(len(texts), 1, 1), torch.zeros(len(texts), 1, 4),
                           torch.arange(len(texts)))
    para = paraphrase_split(split, texts, paraphraser=Drawn(), tokenizer=_tokenizer)
    substituted = torch.tensor([bool(s) for s in para.substitutions])
    assert torch.equal(para.input_ids[~substituted], ids[~substituted])  # no substitution: tokens bit for bit
    assert torch.equal(para.changed, (para.input_ids != ids).any(dim=1))  # changed = the model's input changed
    assert not bool((para.changed & ~substituted).any()) and para.n_changed <= int(substituted.sum())
    new_ids, _ = _tokenizer(list(para.texts))
    assert torch.equal(para.input_ids, new_ids)  # every row is the tokenised paraphrase


def test_default_features_keep_the_run_keys_of_earlier_records() -> None:
    # a record written before `features` existed (CRAFT) must still resume: its key is computed without the field
    import hashlib
    from dataclasses import asdict

    data = SimpleNamespace(summary="train 5 / 5, val 1 / 1, test 2 / 2")
    cfg = R.RetrievalConfig(features="craft", relative=False)  # explicit: the key must not depend on the defaults
    left_out = ("features", "relative", "attention", *R.config.PRETRAIN_FIELDS)  # pretrain_*: no pre-training stage
    old_fields = {k: v for k, v in asdict(cfg).items() if k not in left_out}
    blob = json.dumps({"backbone": "uniter", "arm": "villa", "config": old_fields, "data": data.summary}, sort_keys=True)
    assert runs._config_key("uniter", "villa", cfg, data) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert runs._config_key("uniter", "villa", replace(cfg, features="effnet"), data) != runs._config_key(
        "uniter", "villa", cfg, data)
