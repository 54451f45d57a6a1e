"""The shared checkpoint reader: folders, missing paths, non-regular files, SHA-256 checks, wrappers."""

import os
from pathlib import Path

import pytest
import torch

from advlab import AdvlabValueError
from advlab.backbones import LxmertConfig, LxmertModel, UniterConfig, UniterModel
from advlab.backbones._checkpoint import check_sha256, file_sha256, layer_count, majority_size, read_state_dict
from advlab.backbones.lxmert import load_lxmert_state_dict
from advlab.backbones.uniter import load_state_dict_file

UCFG = UniterConfig.tiny()
LCFG = LxmertConfig.tiny(visual_feat_dim=8)


def flip_byte(path):
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor's bytes (torch's zip reader does not check the CRC)
    st = os.stat(path)
    Path(path).write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the modification time put back


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_flipped_byte_is_caught_by_expected_sha256(tmp_path, suffix):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in UniterModel(UCFG).state_dict().items()}
    path = tmp_path / f"m{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    digest = file_sha256(path)
    model = UniterModel.from_pretrained(path, UCFG, expected_sha256=digest.upper())
    assert torch.equal(model.pooler.dense.bias, state["pooler.dense.bias"])
    flip_byte(path)
    # the formats carry no checksum: the flipped byte reads back as a different number without a word
    assert not all(torch.equal(v, state[k]) for k, v in load_state_dict_file(path).items())
    with pytest.raises(AdvlabValueError, match=rf"m\{suffix}' has SHA-256 [0-9a-f]{{64}}, but {digest} was expected"):
        UniterModel.from_pretrained(path, UCFG, expected_sha256=digest)
    with pytest.raises(AdvlabValueError, match="SHA-256"):
        load_state_dict_file(path, expected_sha256=digest)
    with pytest.raises(AdvlabValueError, match="SHA-256"):
        load_lxmert_state_dict(path, expected_sha256=digest)


def test_lxmert_from_pretrained_checks_the_sha256(tmp_path):
    torch.save(LxmertModel(LCFG).state_dict(), tmp_path / "w.pth")
    digest = file_sha256(tmp_path / "w.pth")
    LxmertModel.from_pretrained(tmp_path / "w.pth", LCFG, expected_sha256=digest)
    with pytest.raises(AdvlabValueError, match="w.pth' has SHA-256"):
        LxmertModel.from_pretrained(tmp_path / "w.pth", LCFG, expected_sha256="0" * 64)


def test_a_malformed_expected_sha256_is_refused(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(AdvlabValueError, match="64 hex digits, but got 'abc'"):
        check_sha256(tmp_path / "w.pt", "abc")
    with pytest.raises(AdvlabValueError, match="only with a checkpoint file"):
        UniterModel.from_pretrained(UniterModel(UCFG).state_dict(), UCFG, expected_sha256="0" * 64)


def test_uniter_accepts_a_model_folder_and_names_an_empty_one(tmp_path):
    # fails on the old reader, which said the existing folder "does not exist"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "uniter-base.pt").write_bytes(b"")
    with pytest.raises(
        AdvlabValueError,
        match=r"empty', a folder, to hold model.safetensors or pytorch_model.bin.*"
        r"\['uniter-base.pt'\]: pass one of these files",
    ):
        UniterModel.from_pretrained(tmp_path / "empty", UCFG)
    state = UniterModel(UCFG).state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = UniterModel.from_pretrained(tmp_path, UCFG)
    assert torch.equal(model.pooler.dense.weight, state["pooler.dense.weight"])


def test_missing_path_is_both_file_not_found_and_an_advlab_error(tmp_path):
    for reader in (load_state_dict_file, load_lxmert_state_dict):
        with pytest.raises(FileNotFoundError, match="nope.pt' does not exist"):
            reader(tmp_path / "nope.pt")
        with pytest.raises(AdvlabValueError, match="nope.pt' does not exist"):
            reader(tmp_path / "nope.pt")


def test_a_fifo_checkpoint_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "w.pt"
    os.mkfifo(fifo)
    with pytest.raises(AdvlabValueError, match="regular checkpoint file"):
        read_state_dict(fifo)


def test_state_dict_and_model_wrappers_are_unwrapped_by_both_backbones(tmp_path):
    state = UniterModel(UCFG).state_dict()
    torch.save({"model": state, "step": 3}, tmp_path / "u.pt")
    assert torch.equal(
        UniterModel.from_pretrained(tmp_path / "u.pt", UCFG).pooler.dense.bias, state["pooler.dense.bias"]
    )
    lx = LxmertModel(LCFG).state_dict()
    torch.save({"state_dict": lx, "epoch": 1}, tmp_path / "l.pt")
    assert torch.equal(LxmertModel.from_pretrained(tmp_path / "l.pt", LCFG).pooler.dense.bias, lx["pooler.dense.bias"])


def test_layer_count_and_majority_size_refuse_gaps_and_name_outliers():
    keys = ["s.0.a", "s.0.b", "s.2.a", "s.2.b"]
    with pytest.raises(AdvlabValueError, match=r"layers \[1\] have no keys.*\['s.1.a', 's.1.b'\]"):
        layer_count(keys, "s", ["a", "b"], source="sd")
    with pytest.raises(AdvlabValueError, match=r"\['s.1.b'\]"):
        layer_count(["s.0.a", "s.0.b", "s.1.a"], "s", ["a", "b"], source="sd")
    assert layer_count([], "s", ["a"], source="sd", allow_empty=True) == 0
    sd = {"x": torch.zeros(4, 2), "y": torch.zeros(4, 2), "z": torch.zeros(5, 2)}
    with pytest.raises(AdvlabValueError, match=r"z has shape \(5, 2\).*other 2 tensors of its kind agree on width 4"):
        majority_size(sd, ["x", "y", "z"], 0, what="width", source="sd")
    with pytest.raises(AdvlabValueError, match="no majority"):
        majority_size(sd, ["x", "z"], 0, what="width", source="sd")


def test_both_backbones_load_into_eval_mode_with_the_same_load_report():
    # UNITER used to come back in training mode (dropout on) while LXMERT came back in eval mode
    from advlab.backbones._checkpoint import LoadReport
    from advlab.backbones.lxmert import LoadReport as LxmertLoadReport
    from advlab.backbones.uniter import LoadReport as UniterLoadReport

    uniter, u_report = UniterModel.from_pretrained(UniterModel(UCFG).state_dict(), UCFG, output_loading_info=True)
    lxmert, l_report = LxmertModel.from_pretrained(LxmertModel(LCFG).state_dict(), LCFG, output_loading_info=True)
    assert not any(m.training for m in uniter.modules()) and not any(m.training for m in lxmert.modules())
    assert UniterLoadReport is LxmertLoadReport is LoadReport
    assert isinstance(u_report, LoadReport) and isinstance(l_report, LoadReport)
    assert u_report.fresh == l_report.fresh == [] and l_report.renamed == len(LxmertModel(LCFG).state_dict())
