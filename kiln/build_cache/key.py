"""The build cache key: everything that decides an engine, and nothing else.

:class:`KeyParts` holds, as plain JSON values:

- ``source``: a local HF checkpoint's ``{"files": {name: sha256}}`` over exactly the files
  conversion reads (:func:`kiln.converters.source.files_read`: a README, ``.git`` or an optimizer
  state beside them changes nothing); a hub model's ``{"repo_id", "commit"}`` (the revision asked
  for, resolved to the commit downloaded);
- ``kiln``: kiln's version and a digest of the code that converts and builds (every ``.py`` of
  the package but the runtime, server, CLI, testing helpers and this cache), so an edited
  editable install rebuilds too;
- ``convert``: dtype (resolved: see :func:`resolve_dtype`), tp_size, pp_size, allow_pickle;
- ``backend``, ``backend_versions`` (the libraries the backend records in the manifest),
  ``targets`` (resolved: the backend's default targets on this machine when none are given);
- ``build``: the :class:`~kiln.builder.options.BuildOptions` fields in :data:`KEYED` (limits,
  plugins with ``auto`` dropped, flags).

How a build runs (``workers``, ``max_build_memory``) is not in the key: it changes the time and
memory a build takes, not what the engine computes. :data:`KEYED`, :data:`UNKEYED` and
:data:`FIXED` cover every BuildOptions field (a test checks), so a new build option has to be
placed in one of them.

The key is the sha256 of the parts' canonical JSON (sorted keys) with :data:`KEY_FORMAT`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import kiln
from kiln.errors import UNREADABLE_JSON, USER_TEXT, option

log = logging.getLogger(__name__)

KEY_FORMAT = 1
# BuildOptions fields: in the key / how the build runs / set by the cache itself.
KEYED = ("backend", "max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens",
         "targets", "plugins", "allow_long_context", "gather_context_logits",
         "weight_only_int8_compute")
UNKEYED = ("max_build_memory", "workers")
FIXED = {"checkpoint_dir": ".", "output_dir": ".", "overwrite": False, "dtype": None}  # values
# the cache builds with (the dirs are its own; dtype goes to the conversion)
# Packages and modules of kiln whose code does not decide an engine's files.
NOT_BUILD_CODE = ("runtime", "serve", "cli", "testing", "build_cache")
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class SourceId:
    """An HF checkpoint as the cache sees it: what to convert and what identifies it."""

    directory: Path  # the local dir (a hub model's snapshot)
    model_dir: str  # passed to convert_checkpoint
    revision: str | None  # passed to convert_checkpoint (the commit, for a hub model)
    label: str  # for people: the path, or org/name@commit
    key: dict[str, Any]


@dataclass(frozen=True)
class KeyParts:
    source: dict[str, Any]
    kiln: dict[str, str]
    convert: dict[str, Any]
    backend: str
    backend_versions: dict[str, str]
    targets: tuple[str, ...]
    build: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"format": KEY_FORMAT, **dataclasses.asdict(self), "targets": list(self.targets)}

    def key(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def identify_source(model: str, revision: str | None, allow_pickle: bool,
                    memo_dir: Path) -> SourceId:
    """Locate ``model`` (a local dir wins; else a hub id, downloaded as convert_checkpoint would)
    and identify its content (module docstring). Bad input raises as convert_checkpoint does."""
    from kiln.build_cache.hashes import content_hashes
    from kiln.converters.source import files_read, locate
    from kiln.dirs import DirKind, read_config
    from kiln.errors import CheckpointError

    if not str(model).strip():
        raise CheckpointError(f"{option('model', flag='model_dir')} is empty; pass an HF "
                              f"checkpoint directory or hub id")
    # LLM(model=...) is --model_dir; an engine dir, ...: read_config says so
    path, repo_id = locate(str(model), revision, allow_pickle, "model", "model_dir")
    read_config(path, DirKind.HF_CHECKPOINT, CheckpointError, "model", "model_dir")
    if repo_id is not None and COMMIT.fullmatch(path.name):  # <hub cache>/snapshots/<commit>
        return SourceId(path, repo_id, path.name, f"{repo_id}@{path.name}",
                        {"repo_id": repo_id, "commit": path.name})
    files = files_read(path, allow_pickle)
    hashes = content_hashes(files, memo_dir)
    model_dir = repo_id if repo_id is not None else str(path)
    label = repo_id or str(path.absolute())  # kiln cache list: where it is, wherever run from
    return SourceId(path, model_dir, revision if repo_id else None, label,
                    {"files": {str(p.relative_to(path)): hashes[p] for p in files}})


def source_dtype(model_dir: Path) -> str | None:
    """The HF config's ``torch_dtype`` (``dtype`` in transformers 5), if any."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(USER_TEXT))
    except (OSError, *UNREADABLE_JSON):
        return None
    value = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def default_backend() -> tuple[str, str]:
    """(backend, why): torch on a machine where torch sees a CUDA GPU, else onnx."""
    import torch

    if torch.cuda.is_available():
        return "torch", "the default on a machine with a CUDA GPU"
    return "onnx", "the default on a machine without a CUDA GPU"


@cache
def code_digest() -> str:
    """sha256 over the relative paths and bytes of kiln's build code (module docstring)."""
    package = Path(kiln.__file__).parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.parts[0] in NOT_BUILD_CODE or relative.parts[0] == "__pycache__":
            continue
        h.update(f"{relative.as_posix()}\0".encode())
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def build_part(options: Any) -> dict[str, Any]:
    """The keyed BuildOptions fields other than backend and targets, as JSON values."""
    from kiln.errors import ConfigError
    from kiln.plugins import PLUGINS
    from kiln.plugins.registry import PluginMode, parse_mode

    if unknown := sorted(set(options.plugins) - set(PLUGINS)):
        raise ConfigError(f"unknown plugins {unknown}; known: {sorted(PLUGINS)}")
    out = {name: getattr(options, name) for name in KEYED if name not in ("backend", "targets")}
    out["plugins"] = {name: parse_mode(name, mode).value
                      for name, mode in sorted(options.plugins.items())
                      if parse_mode(name, mode) is not PluginMode.AUTO}
    return out
