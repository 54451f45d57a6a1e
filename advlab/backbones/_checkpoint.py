"""Checkpoint reading shared by the UNITER and LXMERT loaders (and the pretrained-weight loaders).

One reader for `.pt` / `.pth` / `.bin` (torch pickles, read with `weights_only=True`) and `.safetensors` files,
or a Hugging Face model folder; an optional SHA-256 check; and the helpers that infer a layer stack from key
names without guessing: indices must run 0..n-1 and every layer must hold every key a layer has.

Neither torch nor safetensors stores a checksum of the tensor bytes, so a flipped byte inside a tensor reads
back as a slightly different number. Only a SHA-256 of the whole file, compared with a known value, catches it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from advlab._errors import AdvlabTypeError, AdvlabValueError

__all__ = [
    "CheckpointNotFoundError",
    "LoadReport",
    "check_sha256",
    "check_shapes",
    "config_json_beside",
    "file_sha256",
    "layer_count",
    "majority_size",
    "read_state_dict",
]

# a Hugging Face model folder holds one of these (safetensors first, as transformers prefers it)
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_WRAPPERS = ("state_dict", "model")  # {"state_dict": ...} (Lightning and others), {"model": ...} (training scripts)


class CheckpointNotFoundError(AdvlabValueError, FileNotFoundError):
    """A checkpoint path that does not exist (both an `AdvlabValueError` and a `FileNotFoundError`)."""


@dataclass
class LoadReport:
    """What `from_pretrained` did with a state dict (UNITER and LXMERT alike).

    Attributes:
        renamed: Number of keys renamed to this library's names (`bert` -> `uniter` / `lxmert`,
            `gamma`/`beta` -> `weight`/`bias`, DataParallel `module.` dropped, ...).
        dropped: Keys in the file that this model has no place for and that were not used (pre-training
            heads loaded into a task model, for instance).
        fresh: Model keys absent from the file, left freshly initialised (the task head; a UNITER
            backbone key only with `strict=False`).
        grown: Embedding tables grown after loading (UNITER NLVR2 / VCR type rows, VCR words).
        mismatched: Head keys in the file whose shape differs from the model's, not loaded (`key (file
            shape) vs (model shape)`); those model keys are also in `fresh`.

    Examples:
        >>> LoadReport().dropped
        []
    """

    renamed: int = 0
    dropped: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    grown: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def log(self, logger: logging.Logger, model: str, source: str) -> None:
        """Log unused keys at INFO and anything left randomly initialised at WARNING, as transformers does."""
        if self.dropped:
            logger.info(
                "Loading %s into %s: dropped %d keys this model has no place for: %s",
                source,
                model,
                len(self.dropped),
                _listing(sorted(self.dropped)),
            )
        if self.mismatched:
            logger.warning(
                "Loading %s into %s: dropped %d head keys of another size: %s",
                source,
                model,
                len(self.mismatched),
                _listing(self.mismatched),
            )
        if self.fresh:
            logger.warning(
                "Loading %s into %s: freshly initialised %d keys not in the file: %s",
                source,
                model,
                len(self.fresh),
                _listing(self.fresh),
            )


_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file as 64 lower-case hex digits, memoised per (path, inode, size, mtime, ctime).

    The change time cannot be set back by a user, so a file rewritten in place is hashed again even
    when its modification time was restored.

    Args:
        path: The file.

    Returns:
        The hex digest.

    Examples:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x")
        >>> _ = open(p, "wb").write(b"abc")
        >>> file_sha256(p)[:16]
        'ba7816bf8f01cfea'
    """
    path = os.fspath(path)
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[memo] = digest.hexdigest()
    return _HASHES[memo]


def check_sha256(path: str | os.PathLike[str], expected: str, *, what: str = "checkpoint") -> None:
    """Raise unless the file's SHA-256 is `expected` (hex, any case).

    Args:
        path: The file.
        expected: 64 hex digits.
        what: How the file is named in the message.

    Raises:
        AdvlabValueError: `expected` is not 64 hex digits, or the digest differs.

    Examples:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x")
        >>> _ = open(p, "wb").write(b"abc")
        >>> check_sha256(p, "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD")
    """
    if not isinstance(expected, str):
        raise AdvlabTypeError(
            f"Expected `expected_sha256` to be a str of 64 hex digits, but got {type(expected).__name__}."
        )
    want = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise AdvlabValueError(f"Expected `expected_sha256` to be 64 hex digits, but got {expected!r}.")
    got = file_sha256(path)
    if got != want:
        raise AdvlabValueError(
            f"The {what} {os.fspath(path)!r} has SHA-256 {got}, but {want} was expected: the file is corrupt, "
            "truncated or a different file. Download or install it again."
        )


def resolve_checkpoint_path(path: object, *, argument: str = "path") -> str:
    """The checkpoint file `path` names: the file itself, or the weights file inside a model folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise AdvlabTypeError(f"Expected `{argument}` to be a str or os.PathLike, but got {type(path).__name__}.")
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in _FOLDER_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        found = sorted(n for n in os.listdir(path) if n.endswith(_CHECKPOINT_SUFFIXES))
        raise AdvlabValueError(
            f"Expected `{argument}` {path!r}, a folder, to hold {' or '.join(_FOLDER_FILES)} (a Hugging Face model "
            "folder), but it does not"
            + (f"; it holds {found[:10]}: pass one of these files instead." if found else "; pass the checkpoint file.")
        )
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"Expected `{argument}` to be a checkpoint file, but {path!r} does not exist.")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
        raise AdvlabValueError(f"Expected `{argument}` to be a regular checkpoint file, but {path!r} is not one.")
    return path


def read_state_dict(
    path: str | os.PathLike[str], *, expected_sha256: str | None = None, argument: str = "path"
) -> tuple[dict[str, Tensor], str]:
    """Read a flat state dict from a checkpoint file or a Hugging Face model folder, on CPU.

    Pickles are read with `weights_only=True` (no code runs). A `{"state_dict": ...}` or `{"model": ...}`
    wrapper is unwrapped. A file that cannot be read raises an `AdvlabValueError` naming it.

    Args:
        path: The file, or a folder holding `model.safetensors` or `pytorch_model.bin`.
        expected_sha256: If given, the file's SHA-256 must equal it (checked before reading).
        argument: The argument name used in messages.

    Returns:
        Key -> tensor, names as stored, and the path of the file read.
    """
    file = resolve_checkpoint_path(path, argument=argument)
    if expected_sha256 is not None:
        check_sha256(file, expected_sha256)
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file  # lazy: a dependency of the loaders only

            obj: Any = load_file(file, device="cpu")
        else:
            import torch

            obj = torch.load(file, map_location="cpu", weights_only=True)
    except ImportError:
        raise AdvlabValueError(
            f"Expected the `safetensors` package to read {file!r}, but it is not installed (pip install safetensors)."
        ) from None
    except Exception as err:  # noqa: BLE001 - a truncated zip, a bad pickle, a bad header: all mean corrupt
        raise AdvlabValueError(
            f"Could not read checkpoint {file!r}: the file looks corrupt or truncated, or is not a state dict "
            f"({type(err).__name__}: {str(err)[:200]})."
        ) from None
    if not isinstance(obj, Mapping):
        raise AdvlabValueError(
            f"Expected {file!r} to hold a state dict (name -> tensor), but it holds a {type(obj).__name__}."
        )
    if not all(isinstance(v, Tensor) for v in obj.values()):
        for wrapper in _WRAPPERS:
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise AdvlabValueError(
            f"Expected {file!r} to hold a flat dict of tensors (or one under 'state_dict' / 'model'), but these "
            f"keys are not tensors: {bad[:5]}."
        )
    nonstr = [k for k in obj if not isinstance(k, str)]
    if nonstr:
        raise AdvlabValueError(f"Expected the keys of {file!r} to be str, but got {nonstr[:5]}.")
    return dict(obj), file


def config_json_beside(source: object) -> dict[str, Any]:
    """The `config.json` in a model folder or beside a checkpoint file, or {} if there is none (or not a path).

    Args:
        source: What `from_pretrained` was given (a path, or a state dict).

    Returns:
        The JSON object.

    Examples:
        >>> config_json_beside({"a": 1})
        {}
    """
    if not isinstance(source, (str, os.PathLike)):
        return {}
    path = os.fspath(source)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return {}
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise AdvlabValueError(f"Could not read {config!r} as JSON: {err}.") from None
    if not isinstance(data, dict):
        raise AdvlabValueError(f"Expected {config!r} to hold a JSON object, but it holds a {type(data).__name__}.")
    return data


def check_shapes(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, source: str, model: str) -> None:
    """Raise listing every key of `state` whose shape differs from `expected`'s (keys absent there are skipped).

    Args:
        state: The tensors to load.
        expected: The model's state dict (or its tensors under the same keys).
        source: How the checkpoint is named in the message.
        model: How the model is named in the message (class and config).

    Raises:
        AdvlabValueError: Some shapes differ; each such key is named with both shapes.

    Examples:
        >>> import torch
        >>> check_shapes({"w": torch.zeros(2)}, {"w": torch.zeros(2)}, source="sd", model="M")
    """
    wrong = [
        f"{k} expected {tuple(expected[k].shape)}, got {tuple(v.shape)}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise AdvlabValueError(
            f"Expected the tensors in {source} to fit {model}, but {len(wrong)} have another shape: "
            f"{'; '.join(wrong[:10])}{' ...' if len(wrong) > 10 else ''}."
        )


def _listing(keys: Sequence[str], limit: int = 20) -> str:
    return f"{list(keys[:limit])}" + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def layer_count(
    keys: Iterable[str], stack: str, suffixes: Sequence[str], *, source: str, allow_empty: bool = False
) -> int:
    """Number of layers under `stack` (e.g. `uniter.encoder.layer`), refusing any gap or incomplete layer.

    Layer indices must run 0..n-1 and each layer must hold every key in `suffixes` (a layer's
    parameter names, relative to the layer). Otherwise the message lists the missing keys.

    Args:
        keys: The state dict's keys.
        stack: Key prefix of the layer list, without the trailing dot.
        suffixes: The keys one layer holds, relative to `stack.N.`.
        source: How the checkpoint is named in messages.
        allow_empty: Whether zero layers is acceptable (else refused).

    Returns:
        n.

    Examples:
        >>> layer_count(["enc.0.w", "enc.1.w"], "enc", ["w"], source="sd")
        2
    """
    pattern = re.compile(re.escape(stack) + r"\.(\d+)\.(.+)$")
    present: dict[int, set[str]] = {}
    for key in keys:
        if m := pattern.match(key):
            present.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not present:
        if allow_empty:
            return 0
        raise AdvlabValueError(
            f"Expected `{stack}.0.*` keys in {source} to infer the number of layers from, but there are none; "
            "pass `config=`."
        )
    n = max(present) + 1
    missing = [f"{stack}.{i}.{s}" for i in range(n) for s in suffixes if s not in present.get(i, ())]
    if missing:
        gaps = [i for i in range(n) if i not in present]
        raise AdvlabValueError(
            f"Cannot infer the number of `{stack}` layers from {source}: "
            + (f"layers {gaps} have no keys at all, and " if gaps else "")
            + f"{len(missing)} keys are missing: {_listing(missing)}. Layer indices must run from 0 without a gap "
            "and each layer must be complete. Pass `config=` (and `strict=False` where the loader has it) to load "
            "a partial checkpoint on purpose."
        )
    return n


def majority_size(state: Mapping[str, Tensor], keys: Sequence[str], dim: int, *, what: str, source: str) -> int:
    """The size of axis `dim` shared by the tensors at `keys`; a minority that differs is named as corrupt.

    Args:
        state: The state dict.
        keys: Keys that must agree (e.g. every layer's `intermediate.dense.weight`).
        dim: The axis compared.
        what: What the size is, for the message (e.g. "intermediate size").
        source: How the checkpoint is named in messages.

    Returns:
        The common size.

    Examples:
        >>> import torch
        >>> sd = {"a": torch.zeros(3, 2), "b": torch.zeros(3, 2), "c": torch.zeros(3, 2)}
        >>> majority_size(sd, ["a", "b", "c"], 0, what="width", source="sd")
        3
    """
    sizes = {k: (tuple(state[k].shape)[dim] if state[k].dim() > dim else None) for k in keys}
    counts = Counter(sizes.values())
    (best, n_best), *rest = counts.most_common() + [(None, 0)]
    if len(counts) == 1 and best is not None:
        return best
    tie = rest and rest[0][1] == n_best
    if best is None or tie:
        shown = ", ".join(f"{k} {tuple(state[k].shape)}" for k in keys)
        raise AdvlabValueError(
            f"Cannot infer the {what} from {source}: the layers disagree with no majority ({shown}). "
            "The checkpoint is corrupt, or pass `config=`."
        )
    odd = [f"{k} has shape {tuple(state[k].shape)}" for k, s in sizes.items() if s != best]
    raise AdvlabValueError(
        f"Corrupt tensor in {source}: {'; '.join(odd[:10])}, where the other {n_best} tensors of its kind agree on "
        f"{what} {best}. Replace the checkpoint (or pass `config=` and fix these tensors)."
    )
