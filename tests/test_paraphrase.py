"""WordNet paraphrases: the substitution rule, its guarantees, the set-up and its errors.

Needs WordNet 3.0 set up by scripts/setup_data.sh (like the Tux Paint tests need the stamps).
"""

import gzip
import re
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.data import paraphrase as para
from advlab.data.paraphrase import (
    LEXNAMES,
    STOP_WORDS,
    Paraphrase,
    WordNetParaphraser,
    install_wordnet,
    wordnet_dir,
)

CAPTIONS = [
    "A brown potato.",
    "A rhea.",
    "The sign for the number 7 in American Sign Language.",
    "A red car, parked near a big house!",
    "An old-fashioned clothespin.",
    "Mercury—the planet closest to the Sun.",
    "Two cats.",
    "",
]


@pytest.fixture(scope="module")
def p():
    return WordNetParaphraser()


def _expected_text(original: str, subs: tuple[tuple[str, str], ...]) -> str:
    """Apply the listed substitutions to the original, each at the next whole-word match."""
    out, rest = [], original
    for old, new in subs:
        # a word is ASCII letters not touching a letter, digit, "_", "'" or "-" (the documented rule)
        m = re.search(rf"(?<![\w'-]){re.escape(old)}(?![\w'-])", rest)
        assert m is not None, (original, old)
        out += [rest[: m.start()], new]
        rest = rest[m.end() :]
    return "".join(out) + rest


def _share_a_synset(reader, old: str, new: str) -> bool:
    name = new.lower().replace(" ", "_")
    return any(name in [n.lower() for n in s.lemma_names()] for s in reader.synsets(old.lower()))


def test_worked_examples_keep_case_and_punctuation(p):
    assert p("A brown potato.") == Paraphrase("A brownish murphy.", (("brown", "brownish"), ("potato", "murphy")))
    assert p("BROWN Potato!?") == Paraphrase("BROWNISH Murphy!?", (("BROWN", "BROWNISH"), ("Potato", "Murphy")))
    assert p("  a  brown\tpotato ...").text == "  a  brownish\tmurphy ..."
    assert p("A red apple.").text == "A reddish apple."  # "apple" has no other lemma in its first sense


def test_unchanged_when_nothing_applies(p):
    for text in ["A rhea.", "Of the 7.", "", "!!!", "123 456", "Santa Claus.", "It is here.", "Some blueberries."]:
        assert p(text) == Paraphrase(text, ())


def test_deterministic_across_calls_and_instances(p):
    first = p.paraphrase_all(CAPTIONS)
    assert p.paraphrase_all(CAPTIONS) == first
    assert WordNetParaphraser().paraphrase_all(CAPTIONS) == first
    assert first == [p(c) for c in CAPTIONS]  # same order as the input


def test_at_most_max_substitutions(p):
    long = "A brown potato, a red car, a big house and a tall tree."
    assert len(p(long).substitutions) == 2
    one = WordNetParaphraser(max_substitutions=1)
    assert len(one(long).substitutions) == 1
    assert len(WordNetParaphraser(max_substitutions=5)(long).substitutions) > 2


def test_substitutes_are_wordnet_synonyms_of_the_most_frequent_sense(p):
    reader = p.reader
    for caption in CAPTIONS:
        for old, new in p(caption).substitutions:
            assert _share_a_synset(reader, old, new), (old, new)
            assert new.lower() != old.lower()
            assert old.lower() not in new.lower().split()
    # the most frequent sense of "car" (count 71 in cntlist.rev) is the automobile one
    assert p.synonym("car") in [n.replace("_", " ") for n in reader.synset("car.n.01").lemma_names()]


def test_article_agreement_and_determiners(p):
    assert p("A car.").text == "A machine."  # "auto" / "automobile" would need "an"
    assert p("The car.").text == "The auto."
    assert p.synonym("fly") == "wing" and p.synonym("fly", after="the") is None  # a noun after a determiner


def test_stop_words_short_words_and_proper_names_are_skipped(p):
    assert all(p.synonym(w) is None for w in ["the", "seven", "have", "u", "ox"])
    assert p.synonym("Mercury") is None and p.synonym("mercury") is not None
    custom = WordNetParaphraser(stop_words=STOP_WORDS | {"brown"})
    assert custom("A brown potato.").substitutions == (("potato", "murphy"),)


def test_repeated_words_are_replaced_once(p):
    out = p("A car and a car.")
    assert [old for old, _ in out.substitutions] == ["car"]
    assert out.text == _expected_text("A car and a car.", out.substitutions)


def test_bad_arguments(p):
    with pytest.raises(AdvlabTypeError, match="`text` to be a str"):
        p(3)
    with pytest.raises(AdvlabTypeError, match="sequence of captions"):
        p.paraphrase_all("A brown potato.")
    with pytest.raises(AdvlabTypeError, match="`text` to be a str"):
        p.paraphrase_all(["ok", None])
    with pytest.raises(AdvlabValueError, match="at least 1, but got 0"):
        WordNetParaphraser(max_substitutions=0)
    with pytest.raises(AdvlabTypeError, match="int"):
        WordNetParaphraser(max_substitutions=1.5)
    with pytest.raises(AdvlabTypeError, match="single string"):
        WordNetParaphraser(stop_words="the")
    with pytest.raises(AdvlabTypeError, match="hold strings, but it holds 3"):
        WordNetParaphraser(stop_words=["the", 3])
    with pytest.raises(AdvlabTypeError, match="`root` to be a path"):
        WordNetParaphraser(root=3)
    with pytest.raises(AdvlabTypeError, match="`src` to be a path"):
        install_wordnet(None)


def test_missing_wordnet_points_at_the_setup_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/setup_data.sh") as info:
        WordNetParaphraser(root=tmp_path)
    assert f"{tmp_path / 'corpora' / 'wordnet'} does not exist" in str(info.value)
    (tmp_path / "corpora" / "wordnet").mkdir(parents=True)
    for name in para._REQUIRED:
        (tmp_path / "corpora" / "wordnet" / name).write_text("")
    with pytest.raises(FileNotFoundError, match="(?s)lacks lexnames.*scripts/setup_data.sh"):
        WordNetParaphraser(root=tmp_path)  # the file nltk needs and the packages lack
    with pytest.raises(FileNotFoundError, match="scripts/setup_data.sh"):
        wordnet_dir(tmp_path / "nowhere")
    assert wordnet_dir(tmp_path, check=False) == tmp_path


def test_env_variable_moves_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVLAB_CACHE", str(tmp_path))
    assert wordnet_dir(check=False) == tmp_path / "wordnet"
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "wordnet"))):
        wordnet_dir()


def _fake_debs(root, *, man=True, rows=LEXNAMES):
    """The layout `dpkg-deb -x` leaves, with empty dictionary files and a troff lexnames page."""
    dict_dir = root / "usr/share/wordnet"
    dict_dir.mkdir(parents=True)
    for name in para._REQUIRED + ("index.sense",):
        (dict_dir / name).write_text(f"{name}\n")
    if man:
        man_dir = root / "usr/share/man/man5"
        man_dir.mkdir(parents=True)
        # as in the package: a header row, "_", tab-separated rows, one with spaces before its tab
        table = "".join(f"{i:02d}\t{n}{'  ' if n == 'noun.person' else ''}\tstuff here\n" for i, n in enumerate(rows))
        page = f".TH LEXNAMES 5WN\n.TS\nl l l.\n\\fBFile Number\\fP\t\\fBName\\fP\tx\n_\n{table}.TE\n"
        with gzip.open(man_dir / "lexnames.5WN.gz", "wt") as fh:
            fh.write(page)
    return root


def test_install_wordnet_writes_lexnames_from_the_man_page(tmp_path):
    rows_in = [n if n != "noun.Tops" else "noun.tops" for n in LEXNAMES]  # differs from the table: shows the source
    out = install_wordnet(_fake_debs(tmp_path / "src", rows=rows_in), tmp_path / "wn")
    corpus = out / "corpora" / "wordnet"
    rows = [line.split("\t") for line in (corpus / "lexnames").read_text().splitlines()]
    assert len(rows) == 45 and rows[0] == ["00", "adj.all", "3"] and rows[3] == ["03", "noun.tops", "1"]
    assert rows[18] == ["18", "noun.person", "1"]  # the man page pads this name with spaces
    assert rows[29] == ["29", "verb.body", "2"] and rows[2] == ["02", "adv.all", "4"]
    assert (corpus / "index.sense").is_file() and (corpus / "data.noun").read_text() == "data.noun\n"
    assert wordnet_dir(out) == out


def test_lexnames_parser_reads_the_package_table():
    rows = "".join(f"{i:02d}\t{n}\tdescription\n" for i, n in enumerate(reversed(LEXNAMES)))
    assert para._lexnames_from_man(rows) == list(reversed(LEXNAMES))
    assert para._lexnames_from_man("00\tadj.all\tx\n02\tadv.all\tx\n") == []  # a gap: not trusted


def test_install_wordnet_falls_back_to_the_table_and_is_idempotent(tmp_path):
    src = _fake_debs(tmp_path / "src", man=False)
    out = install_wordnet(src / "usr/share/wordnet", tmp_path / "wn")  # the dictionary folder itself
    lexnames = out / "corpora/wordnet/lexnames"
    assert [line.split("\t")[1] for line in lexnames.read_text().splitlines()] == list(LEXNAMES)
    before = lexnames.stat().st_mtime_ns
    assert install_wordnet(tmp_path / "does-not-matter", out) == out  # finished copy: left as is
    assert lexnames.stat().st_mtime_ns == before
    assert [p.name for p in out.iterdir()] == ["corpora"]  # no temporary folder left behind


def test_install_wordnet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No WordNet 3.0 dictionary"):
        install_wordnet(tmp_path, tmp_path / "wn")
    src = _fake_debs(tmp_path / "src")
    (src / "usr/share/wordnet/cntlist.rev").unlink()
    with pytest.raises(FileNotFoundError, match="lacks cntlist.rev"):
        install_wordnet(src, tmp_path / "wn")


def test_real_setup_lexnames_match_the_table():
    rows = (wordnet_dir() / "corpora/wordnet/lexnames").read_text().splitlines()
    assert [r.split("\t")[1] for r in rows] == list(LEXNAMES)
    assert WordNetParaphraser().reader.get_version() == "3.0"


_VOCAB = [
    "a", "an", "the", "A", "The", "brown", "Brown", "BROWN", "potato", "car", "Car", "big", "red", "house",
    "sign", "fly", "letter", "apple", "rhea", "Mercury", "old-fashioned", "t-shirt", "it's", "cats", "7", "3D",
    "u", "of", "run", "running", "dog", "café", "_x", "x_y", "qwzx",
]  # fmt: skip
_words = st.one_of(st.sampled_from(_VOCAB), st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=8))
_seps = st.sampled_from([" ", "  ", ", ", ". ", "-", "'", "\n", "“", "—", "(", ") ", "_", "’"])


@given(words=st.lists(st.tuples(_words, _seps), max_size=12))
def test_property_differs_exactly_at_the_listed_words(p, words):
    text = "".join(w + s for w, s in words)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = p(text)
    assert len(out.substitutions) <= 2
    assert out.text == _expected_text(text, out.substitutions)
    for old, new in out.substitutions:
        assert new != old and re.fullmatch(r"[A-Za-z]+(?:['-][A-Za-z]+)*", old)
        assert new.lower().replace(" ", "_") in {
            n.lower() for s in p.reader.synsets(old.lower()) for n in s.lemma_names()
        }
    assert p(text) == out


@given(text=st.text(max_size=40))
def test_property_any_text_never_raises(p, text):
    out = p(text)
    assert len(out.substitutions) <= 2
    assert out.text == _expected_text(text, out.substitutions)


def test_tux_paint_share(p):
    from advlab.data.captions import scan_caption_folder
    from advlab.data.tuxpaint import tuxpaint_stamps_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captions = sorted({item.caption for item in scan_caption_folder(tuxpaint_stamps_dir(), check="none")})
    results = p.paraphrase_all(captions)
    changed = [r for r in results if r.substitutions]
    assert 0.4 < len(changed) / len(captions) < 0.95  # 64% measured (Debian 12's stamps)
    assert any(len(r.substitutions) == 2 for r in results)
    assert all(r.text != c for r, c in zip(results, captions) if r.substitutions)
