"""The retrieval experiment's image-feature option: config, data, model width, CLI validation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from advlab._errors import AdvlabValueError
from advlab.experiments import retrieval as R
from advlab.experiments.retrieval import cli
from advlab.experiments.retrieval.data import FEATURE_SETTINGS, feature_function

WORDS = ["red", "blue", "green", "cat", "dog", "car", "tree", "a"]


def _tokenizer(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(texts), 6, dtype=torch.long)
    for i, text in enumerate(texts):
        toks = [1] + [3 + WORDS.index(w) for w in text.lower().rstrip(".").split() if w in WORDS][:4] + [2]
        ids[i, : len(toks)] = torch.tensor(toks)
    return ids, ids != 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stamps")
    colours = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    for c, rgb in colours.items():
        for t in ["cat", "dog", "car", "tree"]:
            image = Image.new("RGBA", (40, 24), (0, 0, 0, 0))
            image.paste(Image.new("RGBA", (20, 12), (*rgb, 255)), (10, 6))
            image.save(root / f"{c}_{t}.png")
            (root / f"{c}_{t}.txt").write_text(f"A {c} {t}.\n")
    return root


def test_config_features_default_and_bad_values() -> None:
    assert R.RetrievalConfig().features in ("craft", "effnet")
    with pytest.raises(AdvlabValueError, match=r"Expected `features` to be one of \['craft', 'effnet'\], but got 'vgg'"):
        R.RetrievalConfig(features="vgg")  # type: ignore[arg-type]


def test_prepare_data_names_its_features_and_the_model_takes_their_width(folder: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVLAB_CACHE", str(tmp_path))  # the feature cache of the fixture stays in tmp_path
    widths = {"craft": 512, "effnet": 320}
    for name in ("craft", "effnet"):
        data = R.prepare_data(folder, tokenizer=_tokenizer, features=name, text_weights=None,
                              vocab_size=len(WORDS) + 3, progress=False)
        assert data.image_features == name
        assert data.train.features.shape[1:] == (17, widths[name])
        cfg = R.RetrievalConfig(layers=1, proj_dim=8, features=name)  # type: ignore[arg-type]
        model = R.build_model("uniter", cfg, data, seed=0,
                              text_size={"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32})
        assert model.net.img_embeddings.img_linear.in_features == widths[name]  # type: ignore[union-attr]
        other = "craft" if name == "effnet" else "effnet"
        with pytest.raises(AdvlabValueError, match=f"config's features '{other}'.*holds '{name}'"):
            R.build_model("uniter", replace(cfg, features=other), data, seed=0)  # type: ignore[arg-type]


def test_feature_function_refuses_unknown_names() -> None:
    assert set(FEATURE_SETTINGS) == {"craft", "effnet"}
    with pytest.raises(AdvlabValueError, match="`features` to be one of"):
        feature_function("clip")
    with pytest.raises(AdvlabValueError, match="`features` to be one of"):
        R.prepare_data(".", features="clip")


def test_a_custom_feature_function_is_unnamed_and_works_with_any_config(folder: Path) -> None:
    def colour(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(len(paths), 5, 6), torch.rand(len(paths), 5, 4)

    data = R.prepare_data(folder, tokenizer=_tokenizer, features=colour, text_weights=None, vocab_size=len(WORDS) + 3)
    assert data.image_features is None
    R.build_model("uniter", R.RetrievalConfig(layers=1, proj_dim=8, grid=2, features="effnet"), data, seed=0,
                  text_size={"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32})


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["--features", "vgg"], "argument --features: invalid choice: 'vgg'"),
     (["--features"], "argument --features: expected one argument")],
)
def test_cli_refuses_bad_features(argv: list[str], named: str, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "prepare_data", lambda *a, **k: pytest.fail("data prepared despite a bad argument"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--no-progress"])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_cli_passes_the_chosen_features_to_the_data_and_the_configs(folder: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_prepare(path: Path, **kw: object) -> R.RetrievalData:
        seen["prepare"] = kw
        raise R.GateError("stop")  # caught nowhere before the runs: an AdvlabError exits with 2

    monkeypatch.setattr(cli, "prepare_data", fake_prepare)
    settings = tmp_path / "s.json"
    settings.write_text('{"base": {"features": "craft", "epochs": 3}}')
    code = cli.main(["--data", str(folder), "--settings", str(settings), "--features", "effnet", "--no-progress"])
    assert code == 2
    assert seen["prepare"]["features"] == "effnet"  # type: ignore[index]
    seen.clear()
    cli.main(["--data", str(folder), "--settings", str(settings), "--no-progress"])
    assert seen["prepare"]["features"] == "craft"  # type: ignore[index]


def test_cli_settings_that_are_not_json_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "s.json"
    bad.write_text("{not json")
    assert cli.main(["--data", str(tmp_path), "--settings", str(bad), "--no-progress"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["--dataset", "coco"], "argument --dataset: invalid choice: 'coco'"),
     (["--dataset", "tuxpaint", "--data", "."], "argument --data: not allowed with argument --dataset")],
)
def test_cli_refuses_bad_datasets(argv: list[str], named: str, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "prepare_data", lambda *a, **k: pytest.fail("data prepared despite a bad argument"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--no-progress"])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["tuxpaint", "openclipart", "both"])
def test_cli_dataset_picks_the_folders(dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from advlab.experiments.retrieval import data as D

    tux, clip = tmp_path / "tux", tmp_path / "clip"
    monkeypatch.setattr(D, "_stamps_folder", lambda: tux)
    monkeypatch.setattr(D, "_openclipart_folder", lambda: clip)
    seen: list[object] = []

    def fake_prepare(folder: object, **kw: object) -> R.RetrievalData:
        seen.append(folder)
        raise R.GateError("stop")

    monkeypatch.setattr(cli, "prepare_data", fake_prepare)
    assert cli.main(["--dataset", dataset, "--no-progress"]) == 2
    assert seen == [{"tuxpaint": tux, "openclipart": clip, "both": [tux, clip]}[dataset]]


def test_a_missing_openclipart_folder_exits_2_naming_the_setup_script(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ADVLAB_CACHE", str(tmp_path))  # no openclipart/pairs there
    assert cli.main(["--dataset", "openclipart", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "openclipart" in err and "scripts/setup_data.sh" in err


def test_two_folders_are_pooled_before_the_split_by_caption(folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for i, thing in enumerate(["boat", "sun", "moon", "star", "cup", "hat"]):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(other / f"{thing}.png")
        (other / f"{thing}.txt").write_text(f"A {thing}.\n")
    (other / "red_cat.png").write_bytes((folder / "red_cat.png").read_bytes())
    (other / "red_cat.txt").write_text("A red cat.\n")  # the same caption as in `folder`: one caption, two images

    def feats(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(len(paths), 5, 3), torch.zeros(len(paths), 5, 4)

    kw = {"tokenizer": _tokenizer, "features": feats, "text_weights": None, "vocab_size": len(WORDS) + 3}
    both = R.prepare_data([folder, other], **kw)  # type: ignore[arg-type]
    one = R.prepare_data(folder, **kw)  # type: ignore[arg-type]
    n_both = len(both.train) + len(both.val) + len(both.test)
    assert len(one.train) + len(one.val) + len(one.test) == 12
    # 19 images, 18 distinct captions: train keeps both images of a shared caption, val / test one
    assert 18 <= n_both <= 19
    assert both.summary != one.summary
    train_caps = both.train.caption_ids.tolist()
    assert len(set(train_caps)) + len(both.val) + len(both.test) == 18
