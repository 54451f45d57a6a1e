"""Paraphrase captions by WordNet synonym substitution: deterministic, listed, offline.

[`WordNetParaphraser`][advlab.data.paraphrase.WordNetParaphraser] replaces one or two content
words of a caption by a WordNet 3.0 synonym ("A brown potato." becomes "A brownish murphy.") and
lists what it replaced, so a retrieval model can be scored on captions it has never seen worded
that way. The rule, applied to each word from left to right until `max_substitutions` words are
replaced:

1. A word is a run of ASCII letters, possibly joined by `-` or `'` ("t-shirt"), not touching a
   digit, an underscore or a non-ASCII letter. Everything else (spaces, punctuation, numbers) is
   copied unchanged.
2. Skipped: stop words (articles, pronouns, prepositions, auxiliaries, number words:
   `STOP_WORDS`), words of one or two letters ("u" in "The letter u."), a word with a capital
   first letter (not all capitals) that WordNet also lists capitalised, as a proper name
   ("Mercury", "Moon", also "Brown" at the start of a sentence: meaning first), and a word whose
   lower-case form was already replaced earlier in the caption.
3. The word's sense is its most frequent one: among the noun, verb and adjective synsets holding
   a lemma spelled like the word (case-insensitively, so only base forms match: "potatoes" is
   left alone and the sentence stays grammatical), the lemma with the highest tagged-sense count
   (`cntlist.rev`) wins; ties go to WordNet's own order (nouns, verbs, adjectives; then sense
   number). Right after a determiner (`DETERMINERS`: "a", "the", "my", ...) verb senses are
   left out, so "A fly." reads the insect, not the verb.
4. The synonym is the first lemma of that synset, in WordNet's order, that is all lower-case
   (no proper names), does not contain the word itself ("white potato" is skipped for
   "potato"), and, right after "a"/"an", starts with a vowel exactly when the word does, so the
   article stays right. Underscores become spaces. A word with no such lemma is skipped.
5. The replacement takes the word's case: "Potato" gives "Murphy", "POTATO" gives "MURPHY".

No random numbers are drawn: the same caption always gives the same paraphrase. A caption with no
substitutable word comes back unchanged with no substitutions.

Set-up: WordNet 3.0 comes from Debian's `wordnet-base` and `wordnet-sense-index` packages.
`scripts/setup_data.sh` downloads them with `apt-get download` (no root) and calls
[`install_wordnet`][advlab.data.paraphrase.install_wordnet], which copies the dictionary files
into `${ADVLAB_CACHE:-~/.cache/advlab}/wordnet/corpora/wordnet/` and writes the `lexnames` file
nltk's reader needs (the packages lack it; it is the table in the `lexnames(5WN)` man page the
package ships). The library never runs a package manager itself. The reader is nltk's
`WordNetCorpusReader` (`pip install "advlab[data]"`), imported only when a paraphraser is built.

Licence: WordNet 3.0 is Copyright 2006 by Princeton University, under the WordNet 3.0 licence
(permissive: use, copy, modify and distribute for any purpose without fee, keeping the copyright
notice; the package's `copyright` file is copied beside the dictionary).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advlab._errors import AdvlabTypeError, AdvlabValueError
from advlab.data._cache import as_path, cache_root

__all__ = [
    "DETERMINERS",
    "LEXNAMES",
    "STOP_WORDS",
    "Paraphrase",
    "WordNetParaphraser",
    "install_wordnet",
    "wordnet_dir",
]

# The 45 WordNet 3.0 lexicographer files (number = position), as listed in lexnames(5WN). Used
# only when the man page cannot be read; install_wordnet derives the file from the man page.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip
"""The 45 lexicographer file names of WordNet 3.0, in file-number order (the `lexnames` fallback)."""
_LEXNAME_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}  # the man page's "syntactic category" codes

STOP_WORDS: frozenset[str] = frozenset(
    """a an the this that these those some any each every no not all both either neither other another such
    i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
    myself yourself himself herself itself ourselves themselves who whom whose which what when where why how
    there here than then so too very just only also as and or but nor if because while of at by for with
    about against between into through during before after above below to from up down in out on off over
    under again further once is am are was were be been being have has had having do does did doing
    will would shall should can could may might must ought let lets get gets got one two three four five six
    seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty
    thirty forty fifty sixty seventy eighty ninety hundred thousand million billion zero first second third
    many much more most few less least own same s t""".split()  # noqa: SIM905 (a list literal would run 180 lines)
)
"""Words never substituted: function words, auxiliaries and number words (lower case)."""

DETERMINERS: frozenset[str] = frozenset(
    "a an the this that these those my your his her its our their some any each every no".split()  # noqa: SIM905
)
"""Words after which a word is read as a noun or adjective, never a verb (lower case)."""

_WORD = re.compile(r"(?<![\w'-])[A-Za-z]+(?:['-][A-Za-z]+)*(?![\w'-])")
_REQUIRED = tuple(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")) + (
    "noun.exc",
    "verb.exc",
    "adj.exc",
    "adv.exc",
    "cntlist.rev",  # tagged-sense counts: the "most frequent sense" of the rule
)
_OPTIONAL = ("index.sense", "cntlist", "sentidx.vrb", "sents.vrb", "frames.vrb")  # sense keys, verb frames
_DEB_DICT = Path("usr/share/wordnet")
_DEB_MAN = Path("usr/share/man/man5/lexnames.5WN.gz")
_DEB_COPYRIGHT = Path("usr/share/doc/wordnet-base/copyright")
_SETUP_HINT = "Run `scripts/setup_data.sh` (it fetches Debian's wordnet-base and wordnet-sense-index, no root needed)"


def _corpus(root: Path) -> Path:
    return root / "corpora" / "wordnet"


def _missing(root: Path) -> list[str]:
    corpus = _corpus(root)
    return [name for name in (*_REQUIRED, "lexnames") if not (corpus / name).is_file()]


def wordnet_dir(root: str | os.PathLike[str] | None = None, *, check: bool = True) -> Path:
    """The WordNet data root: the folder whose `corpora/wordnet/` holds the dictionary files.

    Args:
        root: The folder to use; None means `${ADVLAB_CACHE:-~/.cache/advlab}/wordnet`.
        check: Raise if the dictionary files (and `lexnames`) are not all there.

    Returns:
        The root folder (pass it to nltk as a `nltk.data.path` entry).

    Raises:
        FileNotFoundError: `check` is true and files are missing; the message names them and
            says to run `scripts/setup_data.sh`.
        AdvlabTypeError: `root` is not a path.

    Examples:
        >>> import tempfile
        >>> wordnet_dir(check=False).name
        'wordnet'
        >>> try:
        ...     wordnet_dir(tempfile.mkdtemp())
        ... except FileNotFoundError as err:
        ...     print(str(err).splitlines()[0][:40])
        WordNet 3.0 was not found under /tmp/tmp
    """
    folder = as_path("root", root) if root is not None else cache_root() / "wordnet"
    if check:
        missing = _missing(folder)
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            what = (
                f"{_corpus(folder)} lacks {shown}" if _corpus(folder).is_dir() else f"{_corpus(folder)} does not exist"
            )
            raise FileNotFoundError(
                f"WordNet 3.0 was not found under {folder}: {what}.\n"
                f"{_SETUP_HINT}, or pass `root=` a folder prepared by `install_wordnet`."
            )
    return folder


def _lexnames_from_man(text: str) -> list[str]:
    """The lexicographer file names of the man page's table, in file-number order."""
    rows = re.findall(r"^(\d\d)\t\s*([a-z]+\.[A-Za-z]+)\s*\t", text, flags=re.MULTILINE)
    names = [name for _, name in sorted(rows, key=lambda row: int(row[0]))]
    if [int(n) for n, _ in sorted(rows, key=lambda row: int(row[0]))] != list(range(len(rows))):
        return []
    return names


def install_wordnet(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
) -> Path:
    """Copy WordNet 3.0 from unpacked Debian packages into an nltk data root, with `lexnames`.

    `src` is where `wordnet-base` and `wordnet-sense-index` were unpacked (`dpkg-deb -x PKG.deb
    SRC`), or `/` for installed packages, or the dictionary folder itself (the one holding
    `data.noun`). The dictionary files go to `DST/corpora/wordnet/`, with a `lexnames` file
    derived from the `lexnames(5WN)` man page under `SRC/usr/share/man/man5/` (from the built-in
    [`LEXNAMES`][advlab.data.paraphrase.LEXNAMES] table when the man page is absent) and the
    package's `copyright` file. The files are written into a temporary folder renamed at the
    end, so an interrupted call leaves no half copy; a finished copy is left as is.

    Args:
        src: The unpacked packages' root, `/`, or the dictionary folder.
        dst: The data root; None means `${ADVLAB_CACHE:-~/.cache/advlab}/wordnet`.

    Returns:
        The data root, ready for [`WordNetParaphraser`][advlab.data.paraphrase.WordNetParaphraser].

    Raises:
        FileNotFoundError: `src` lacks dictionary files; the message lists them.
        AdvlabTypeError: `src` or `dst` is not a path.

    Examples:
        >>> import tempfile
        >>> try:
        ...     install_wordnet(tempfile.mkdtemp(), tempfile.mkdtemp())
        ... except FileNotFoundError as err:
        ...     print(str(err)[:33])
        No WordNet 3.0 dictionary in /tmp
    """
    root = as_path("src", src)
    out = as_path("dst", dst) if dst is not None else cache_root() / "wordnet"
    if not _missing(out):
        return out
    dict_dir = next((d for d in (root, root / _DEB_DICT) if (d / "data.noun").is_file()), None)
    if dict_dir is None:
        raise FileNotFoundError(
            f"No WordNet 3.0 dictionary in {root}: expected {root / _DEB_DICT / 'data.noun'} "
            f"(unpack wordnet-base there with `dpkg-deb -x`) or {root / 'data.noun'}. {_SETUP_HINT}."
        )
    missing = [name for name in _REQUIRED if not (dict_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"The WordNet dictionary in {dict_dir} lacks {', '.join(missing)}. {_SETUP_HINT}.")
    names: list[str] = []
    for man in (root / _DEB_MAN, dict_dir.parent / "man" / "man5" / "lexnames.5WN.gz"):
        if man.is_file():
            with gzip.open(man, "rt", encoding="utf-8", errors="replace") as page:
                names = _lexnames_from_man(page.read())
            break
    if len(names) != len(LEXNAMES):
        names = list(LEXNAMES)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=out))
    try:
        for name in (*_REQUIRED, *_OPTIONAL):
            if (dict_dir / name).is_file():
                shutil.copyfile(dict_dir / name, tmp / name)
        lines = [f"{i:02d}\t{name}\t{_LEXNAME_POS[name.split('.')[0]]}\n" for i, name in enumerate(names)]
        (tmp / "lexnames").write_text("".join(lines), encoding="utf-8")
        for copyright_file in (root / _DEB_COPYRIGHT, dict_dir.parent / "doc" / "wordnet-base" / "copyright"):
            if copyright_file.is_file():
                shutil.copyfile(copyright_file, tmp / "copyright")
                break
        tmp.chmod(0o755)
        corpus = _corpus(out)
        corpus.parent.mkdir(parents=True, exist_ok=True)
        if corpus.exists():
            shutil.rmtree(corpus)
        tmp.rename(corpus)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


_READERS: dict[str, Any] = {}  # one reader per data root and process: loading the index takes seconds


def _load_reader(root: Path) -> Any:
    key = str(root.resolve())
    if key not in _READERS:
        _READERS[key] = _new_reader(root)
    return _READERS[key]


def _new_reader(root: Path) -> Any:
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
        from nltk.data import FileSystemPathPointer
    except ImportError:
        raise ImportError(
            'WordNetParaphraser needs nltk: `pip install "advlab[data]"` (or `pip install nltk`).'
        ) from None
    # nltk >= 3.9 only opens corpus files under a root listed in nltk.data.path: add ours (once, at the end)
    entry = str(root.resolve())
    if entry not in nltk.data.path:
        nltk.data.path.append(entry)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        return WordNetCorpusReader(FileSystemPathPointer(str(_corpus(root).resolve())), None)


@dataclass(frozen=True)
class Paraphrase:
    """A paraphrased caption and the words replaced in it.

    Attributes:
        text: The caption with its substitutions.
        substitutions: `(word, synonym)` pairs in the order they occur in the caption, each as
            written in the original and in `text`; empty when nothing was replaced.

    Examples:
        >>> Paraphrase("A brown murphy.", (("potato", "murphy"),)).substitutions[0][1]
        'murphy'
    """

    text: str
    substitutions: tuple[tuple[str, str], ...] = ()


def _match_case(word: str, synonym: str) -> str:
    if len(word) > 1 and word.isupper():
        return synonym.upper()
    if word[0].isupper():
        return synonym[0].upper() + synonym[1:]
    return synonym


class WordNetParaphraser:
    """Replace one or two content words of a caption by WordNet synonyms (rule in the module docs).

    The first one built in a process loads WordNet's index (5 to 25 s on a busy 2-core CPU; later
    ones reuse it); each distinct word is looked up once and remembered. Building one appends the
    data root to `nltk.data.path`, since nltk >= 3.9 opens corpus files only under those roots.

    Args:
        root: The WordNet data root; None means [`wordnet_dir`][advlab.data.paraphrase.wordnet_dir]`()`.
        max_substitutions: At most this many words are replaced per caption (1 or more).
        stop_words: Lower-case words never replaced.

    Raises:
        FileNotFoundError: WordNet is not set up under `root` (the message says how to set it up).
        ImportError: nltk is not installed.
        AdvlabValueError: `max_substitutions` is below 1.
        AdvlabTypeError: `root` is not a path, `max_substitutions` not an int, or `stop_words` not
            a collection of strings.

    Examples:
        >>> p = WordNetParaphraser()
        >>> p("A brown potato.")
        Paraphrase(text='A brownish murphy.', substitutions=(('brown', 'brownish'), ('potato', 'murphy')))
        >>> WordNetParaphraser(max_substitutions=1)("The BIG car!").text
        'The LARGE car!'
        >>> p("Of the 7.").substitutions
        ()
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        max_substitutions: int = 2,
        stop_words: Iterable[str] = STOP_WORDS,
    ) -> None:
        if not isinstance(max_substitutions, int) or isinstance(max_substitutions, bool):
            raise AdvlabTypeError(
                f"Expected `max_substitutions` to be an int, but got {type(max_substitutions).__name__}."
            )
        if max_substitutions < 1:
            raise AdvlabValueError(f"Expected `max_substitutions` to be at least 1, but got {max_substitutions}.")
        if isinstance(stop_words, str):
            raise AdvlabTypeError("Expected `stop_words` to be a collection of words, but got a single string.")
        stop_words = tuple(stop_words)
        if not all(isinstance(w, str) for w in stop_words):
            bad = next(w for w in stop_words if not isinstance(w, str))
            raise AdvlabTypeError(f"Expected `stop_words` to hold strings, but it holds {bad!r}.")
        self.root = wordnet_dir(root)
        self.max_substitutions = max_substitutions
        self.stop_words = frozenset(w.lower() for w in stop_words)
        self.reader = _load_reader(self.root)
        self._cache: dict[tuple[str, str, bool], str | None] = {}
        self._proper: dict[str, bool] = {}

    def synonym(self, word: str, *, after: str = "") -> str | None:
        """The synonym the rule picks for one word, in lower case, or None.

        Args:
            word: One word as written (its case matters only for proper names).
            after: The word right before it, if only spaces separate them ("" if none):
                after "a" / "an" the synonym keeps the vowel or consonant start, and after a
                determiner verb senses are left out.

        Returns:
            The synonym with spaces for underscores, or None when the word is not replaced.

        Examples:
            >>> p = WordNetParaphraser()
            >>> p.synonym("car"), p.synonym("car", after="a"), p.synonym("the")
            ('auto', 'machine', None)
            >>> p.synonym("fly"), p.synonym("fly", after="the"), p.synonym("Mercury")
            ('wing', None, None)
        """
        key = word.lower()
        if key in self.stop_words or len(key) < 3 or not _WORD.fullmatch(word):
            return None
        if word[0].isupper() and not word.isupper() and self._is_proper_name(word):
            return None
        before = after.lower()
        article = ("vowel" if key[0] in "aeiou" else "consonant") if before in ("a", "an") else ""
        lookup = (key, article, before in DETERMINERS)
        if lookup not in self._cache:
            self._cache[lookup] = self._lookup(*lookup)
        return self._cache[lookup]

    def _is_proper_name(self, word: str) -> bool:
        if word not in self._proper:
            self._proper[word] = any(
                lemma.name() in (word, word.capitalize()) and lemma.name() != lemma.name().lower()
                for synset in self.reader.synsets(word.lower())
                for lemma in synset.lemmas()
            )
        return self._proper[word]

    def _lookup(self, key: str, article: str, no_verbs: bool) -> str | None:
        best = None  # (count, synset) of the most frequent sense; first wins ties
        for synset in self.reader.synsets(key):
            if synset.pos() not in (("n", "a", "s") if no_verbs else ("n", "v", "a", "s")):
                continue
            for lemma in synset.lemmas():
                if lemma.name().lower() == key and (best is None or lemma.count() > best[0]):
                    best = (lemma.count(), synset)
        if best is None:
            return None
        for name in best[1].lemma_names():
            synonym = name.replace("_", " ")
            if synonym != synonym.lower() or key in synonym.replace("-", " ").split():
                continue  # a proper name, or the word itself ("white potato" for "potato")
            if synonym == key or not re.fullmatch(r"[a-z]+(?:[ '-][a-z]+)*", synonym):
                continue
            if article and (synonym[0] in "aeiou") != (article == "vowel"):
                continue
            return synonym
        return None

    def __call__(self, text: str) -> Paraphrase:
        """Paraphrase one caption.

        Args:
            text: The caption.

        Returns:
            The [`Paraphrase`][advlab.data.paraphrase.Paraphrase]; `text` unchanged and no
            substitutions when no word qualifies.

        Raises:
            AdvlabTypeError: `text` is not a string.
        """
        if not isinstance(text, str):
            raise AdvlabTypeError(f"Expected `text` to be a str, but got {type(text).__name__}.")
        pieces: list[str] = []
        done: list[tuple[str, str]] = []
        used: set[str] = set()
        end = 0
        previous, previous_end = "", 0
        for match in _WORD.finditer(text):
            word = match.group()
            after = previous if text[previous_end : match.start()].isspace() else ""
            previous, previous_end = word, match.end()
            if len(done) >= self.max_substitutions or word.lower() in used:
                continue
            synonym = self.synonym(word, after=after)
            if synonym is None:
                continue
            replacement = _match_case(word, synonym)
            pieces += [text[end : match.start()], replacement]
            end = match.end()
            used.add(word.lower())
            done.append((word, replacement))
        pieces.append(text[end:])
        return Paraphrase(text="".join(pieces), substitutions=tuple(done))

    def paraphrase_all(self, texts: Sequence[str]) -> list[Paraphrase]:
        """Paraphrase many captions, in order.

        Args:
            texts: The captions.

        Returns:
            One [`Paraphrase`][advlab.data.paraphrase.Paraphrase] per caption, in the same order.

        Raises:
            AdvlabTypeError: `texts` is a single string, or holds something other than strings.

        Examples:
            >>> [r.text for r in WordNetParaphraser().paraphrase_all(["A red apple.", "A rhea."])]
            ['A reddish apple.', 'A rhea.']
        """
        if isinstance(texts, str):
            raise AdvlabTypeError("Expected `texts` to be a sequence of captions, but got a single string.")
        return [self(text) for text in texts]
