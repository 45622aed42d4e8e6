"""Opening an HF checkpoint: a local directory or a hub id, safetensors (or, if allowed, pickles).

Contract: :func:`open_source` returns a :class:`Source` whose tensors can be listed (names,
shapes, dtypes) without reading data and read one at a time (or by row range). Nothing is
loaded eagerly, so memory stays bounded by the largest tensor read.

Safety: pickle checkpoints (``.bin``/``.pt``/``.pth``) can run code when loaded. They are
refused unless ``allow_pickle`` is set, and then loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from kiln.checkpoint import TOKENIZER_FILES
from kiln.dirs import DirKind, expand_home, is_hub_id, near_path, read_config
from kiln.errors import (
    USER_TEXT,
    CheckpointError,
    ConfigError,
    HubError,
    UnsafeCheckpointError,
    option,
)
from kiln.tensorio import TensorInfo, read_header, read_tensor

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# ModelOpt's quantization record, beside config.json (kiln/converters/quantized.py)
HF_QUANT_CONFIG = "hf_quant_config.json"
# The weights transformers loads, in its order: one file, else the files its index names
# (a Mistral repo's consolidated.safetensors beside the indexed shards is not read)
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_PATTERNS = ("config.json", "generation_config.json", HF_QUANT_CONFIG, "tokenizer*",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                "chat_template.*")  # and the weights: _download


class SourceTensor(Protocol):
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int: ...

    def read(self, rows: tuple[int, int] | None = None) -> torch.Tensor: ...

    def location(self) -> tuple[str, int]: ...


@dataclass(frozen=True)
class SafetensorsTensor:
    info: TensorInfo

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def read(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return read_tensor(self.info, rows)

    def location(self) -> tuple[str, int]:
        return self.info.path.name, self.info.begin


@dataclass(frozen=True)
class LoadedTensor:
    """A tensor from a pickle checkpoint (memory-mapped by torch.load where possible)."""

    tensor: torch.Tensor
    file: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def read(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self.tensor if rows is None else self.tensor[rows[0]:rows[1]]
        return t.clone()

    def location(self) -> tuple[str, int]:
        return self.file, 0


@dataclass
class Source:
    """An opened HF checkpoint."""

    directory: Path
    hf_config: dict[str, Any]
    tensors: dict[str, SourceTensor]
    weight_files: list[Path]
    repo_id: str | None = None
    revision: str | None = None
    extra_files: list[Path] = field(default_factory=list)


def open_source(model_dir: str, revision: str | None = None, allow_pickle: bool = False,
                name: str | None = None) -> Source:
    """Open a local HF checkpoint directory, or download one from the hub by id.

    A local directory wins. A string that does not exist locally is tried on the hub only if
    it has a hub id's form (``org/name``, which is also a relative path): then a failure says
    both that no such local directory exists and why the hub could not provide it. Any other
    missing path (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c`` ...) is a local path that does
    not exist, reported without asking the hub. ``name``: the option ``model_dir`` was given
    as, which a file, a device or a missing path given is named by (:func:`locate`).
    """
    path, repo_id = locate(model_dir, revision, allow_pickle, name)
    _, hf_config = read_config(path, DirKind.HF_CHECKPOINT, CheckpointError, name)
    files = _weight_files(path, allow_pickle)
    tensors: dict[str, SourceTensor] = {}
    found_in: dict[str, Path] = {}
    for file in files:
        for name, tensor in _open_weights(file).items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name!r} is also in "
                                      f"{found_in[name].name}; a checkpoint holds each tensor "
                                      f"once: move the file that is not part of it away")
            tensors[name], found_in[name] = tensor, file
    return Source(path, hf_config, tensors, files, repo_id, revision)


def locate(model_dir: str, revision: str | None = None, allow_pickle: bool = False,
           name: str | None = None, flag: str | None = None) -> tuple[Path, str | None]:
    """``(local directory, hub id or None)`` of ``model_dir`` by :func:`open_source`'s rules: an
    existing local path as it is; otherwise a hub id's snapshot (``snapshot_download`` of the
    files conversion reads: ``<hub cache>/snapshots/<commit>``). Raises as open_source does; a
    missing path is named by ``name`` (the option it was given as, :func:`kiln.errors.option`;
    ``flag``: its flag where that is not ``--name``), as :func:`kiln.dirs.read_config` names a
    file (a retest's ``--model_dir`` of these had named no option)."""
    path = expand_home(model_dir, name or "model_dir", CheckpointError, flag)
    if path.exists():
        if revision is not None:
            raise ConfigError(f"{option('revision', revision)}: {model_dir} is a local "
                              f"directory, and a revision names a commit, branch or tag of a hub "
                              f"model; drop {option('revision')} (or check out that revision "
                              f"into the directory)")
        return path, None
    given = model_dir if name is None else option(name, model_dir, flag)
    missing = f"{given}: no such local directory{_near_miss(path)}"
    if not is_hub_id(model_dir):
        raise CheckpointError(f"{missing}, and not a hub id (those have the form org/name); "
                              f"check the path")
    return _download(model_dir, revision, allow_pickle, missing), model_dir


def files_read(directory: Path, allow_pickle: bool = False) -> list[Path]:
    """Every file of the local HF checkpoint ``directory`` that conversion reads, sorted:
    ``config.json``, ModelOpt's ``hf_quant_config.json``, the weight index, the weight files
    :func:`open_source` picks and the tokenizer files copied into the output. Nothing else in
    the directory (a README, ``.git``, optimizer states, other weight formats) changes a
    conversion's result: the build cache hashes exactly these files (tests check conversion
    opens no other)."""
    directory = Path(directory)
    named = [directory / name for name in ("config.json", HF_QUANT_CONFIG, *TOKENIZER_FILES)]
    weights = _weight_files(directory, allow_pickle)
    single, index = SAFETENSORS if weights[0].suffix == ".safetensors" else PICKLES
    if not (directory / single).is_file() and (directory / index).is_file():
        named.append(directory / index)  # it chose the weights
    return sorted({*(p for p in named if p.is_file()), *weights})


def _near_miss(path: Path) -> str:
    """A hint for a missing local path: a close existing name, or where the path stops existing."""
    guess = near_path(path)
    if guess is not None:
        return f" (did you mean {guess}?)"
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    first = path.relative_to(parent).parts[0]
    return "" if str(parent) == "." else f" ({str(parent).rstrip('/')}/ has no {first})"


def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    """The weight files transformers would load from ``path``: ``model.safetensors``, else those
    ``model.safetensors.index.json`` names, else every ``*.safetensors``; then the same for
    pickles (``pytorch_model.bin`` ...), which need ``allow_pickle``."""
    safetensors = _named_weights(path, *SAFETENSORS) or sorted(path.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickles = _named_weights(path, *PICKLES) or sorted(
        p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and
        not p.name.startswith("training_args"))
    if pickles and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path}: only pickle weights ({', '.join(p.name for p in pickles)}); pickles can run "
            f"code when loaded: pass {option('allow_pickle', True, flag='allow-pickle')} to "
            f"load them with torch.load(weights_only=True)")
    if not pickles:
        raise CheckpointError(f"{path}: no *.safetensors weight files found (nor *.bin, "
                              f"*.pt, *.pth pickles); pass the directory holding the model's "
                              f"weights, or fetch the checkpoint again if they are missing")
    return pickles


def _named_weights(path: Path, single: str, index: str) -> list[Path]:
    """``[path/single]`` if it exists, else the files ``path/index`` names (each must exist),
    else ``[]``. Other weight files beside them are not read (logged)."""
    if (path / single).is_file():
        files = [path / single]
    elif (path / index).is_file():
        files = [path / name for name in index_files(path / index)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path / index}: names {', '.join(missing[:3])}"
                                  f"{' and more' if len(missing) > 3 else ''}, which "
                                  f"{'is' if len(missing) == 1 else 'are'} not in {path}; the "
                                  f"download is incomplete: fetch the checkpoint again")
    else:
        return []
    others = sorted(p.name for p in path.glob(f"*{Path(single).suffix}") if p not in files)
    if others:
        read = single if files == [path / single] else f"the files {index} names"
        log.info("%s: reading %s, as transformers does; not %s", path, read, ", ".join(others))
    return files


def index_files(index: Path) -> list[str]:
    """The weight files a transformers index (``*.index.json``) names, sorted."""
    try:
        data = json.loads(index.read_text(USER_TEXT))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not a readable weight index ({e}); fetch the "
                              f"checkpoint again") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    names = set(weight_map.values()) if isinstance(weight_map, dict) else None
    if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise CheckpointError(f"{index}: its weight_map does not name weight files of this "
                              f"directory; fetch the checkpoint again")
    return sorted(names)


def _weights_to_fetch(snapshot: Path, allow_pickle: bool) -> list[str]:
    """After the first download (config, indexes, single weight files): the weight files still
    to fetch, as patterns, in :func:`_weight_files`' order (none after a model.safetensors)."""
    if (snapshot / SAFETENSORS[0]).is_file():
        return []
    if (snapshot / SAFETENSORS[1]).is_file():
        return index_files(snapshot / SAFETENSORS[1])
    fetch = ["*.safetensors"]
    if allow_pickle and not (snapshot / PICKLES[0]).is_file():
        index = snapshot / PICKLES[1]
        fetch += index_files(index) if index.is_file() else ["*.bin"]
    return fetch


def _open_weights(file: Path) -> dict[str, SourceTensor]:
    if file.suffix == ".safetensors":
        infos, _ = read_header(file)
        return {name: SafetensorsTensor(info) for name, info in infos.items()}
    log.warning("loading pickle checkpoint %s with torch.load(weights_only=True)", file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: cannot load as a weights-only torch pickle ({first:.200}); "
                              f"the file is damaged or not torch.save's: fetch the checkpoint "
                              f"again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
    return {k: LoadedTensor(v, file.name) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _download(repo_id: str, revision: str | None, allow_pickle: bool, missing: str) -> Path:
    """snapshot_download with only the files conversion needs (HF_HOME/HF_TOKEN/HF_HUB_OFFLINE
    apply). ``missing`` starts the error: no local directory of that name exists."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # first the config, tokenizer, weight indexes and single weight files; then the weights
    # transformers would load (_weight_files): those the index names, else every *.safetensors
    patterns = [*HUB_PATTERNS, *SAFETENSORS, *(PICKLES if allow_pickle else ())]
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    at = f"@{revision}" if revision else ""
    log.info("fetching %s%s from the Hugging Face hub", repo_id, at)
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        weights = _weights_to_fetch(path, allow_pickle)
        if weights:
            path = Path(snapshot_download(repo_id, revision=revision,
                                          allow_patterns=[*patterns, *weights]))
        return path
    except LocalEntryNotFoundError:
        why = "offline (HF_HUB_OFFLINE is set) and it is not in the local cache" if offline else \
            "the hub is unreachable and it is not in the local cache"
        fix = "fix the path, or download it where the hub is reachable and pass its directory"
    except GatedRepoError:
        why = "the model is gated"
        fix = "accept its terms on huggingface.co and set HF_TOKEN, or fix the path"
    except RepositoryNotFoundError:
        why = "the hub has no such model (or it is private)"
        fix = "fix the path or the id (set HF_TOKEN for a private model)"
    except RevisionNotFoundError:
        why = f"the hub model has no revision {revision}"
        fix = f"fix {option('revision')}"
    except HfHubHTTPError as e:
        why = f"the hub refused the download ({(str(e).splitlines() or [type(e).__name__])[0]})"
        fix = f"fix the path, or check the id, {option('revision')} and HF_TOKEN"
    raise HubError(f"{missing}, and the hub cannot provide {repo_id}{at}: {why}; {fix}")
