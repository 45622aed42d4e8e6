"""The engine dir's compatibility manifest (``config.json``) and file checks.

An engine dir is self-contained: the manifest, per-rank engine files, and the tokenizer files
copied from the checkpoint. The builder writes it (atomically); the runtime reads the manifest
first and refuses, with the reason and the fix, anything that cannot run on this machine,
before loading any engine file.

Layout (see docs/engine.md):

    config.json            the manifest below
    rank{N}...             backend files, listed per rank in ``manifest.rank_files``
                           (names: :data:`ENGINE_FILE`)
    tokenizer.json ...     copied from the kiln checkpoint (``manifest.other_files``)

File checks: loading checks the presence and size of the files of the ranks it opens
(:func:`check_files`, no data read); sha256 checksums are opt-in (:func:`verify_checksums`,
``--verify_checksums``) and ``kiln verify`` checks every rank's files (:func:`file_problem`).

Non-goals: what is inside a backend's files (``kiln/engine/<backend>_files.py`` where build
and run share a format).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.config import DTYPES, DecoderConfig, Mapping
from kiln.dirs import DirKind, read_config
from kiln.errors import ConfigError, EngineError, check_counts, malformed, option
from kiln.hashing import (  # the one sha256 helper (also imported from here)
    DIGEST_KEY,
    manifest_digest,
    manifest_edited,
    sha256_file,
)
from kiln.quantization.config import QuantConfig

logger = logging.getLogger("kiln.engine")  # the package's name, as before it was one
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # of DTYPES

ENGINE_FORMAT_VERSION = 1
MANIFEST_NAME = "config.json"
BACKENDS = ("onnx", "tensorrt", "torch")
# Names of the backend files beside the manifest: ``rank{N}`` or ``rank{N}.part{k}`` (a rank
# split into a chain of engine parts), then torch ``.safetensors``, onnx ``.onnx`` + its
# weights ``.onnx.data``, tensorrt ``.engine``.
ENGINE_FILE = re.compile(r"rank\d+(\.part\d+)?\.(safetensors|onnx|onnx\.data|engine)")


@dataclass(frozen=True)
class BuildLimits:
    """Shapes an engine was built for. Every step of the runtime stays inside them."""

    max_batch_size: int  # sequences (KV-cache slots) per step
    max_input_len: int  # prompt tokens of one request
    max_seq_len: int  # prompt + generated tokens of one request (KV-cache length)
    max_num_tokens: int  # tokens of all sequences in one step (prefill chunks + decodes)

    def __post_init__(self) -> None:
        # (true had been taken as 1); named as config.json's keys: an engine's limits come
        # from a build's options, checked there, or from its manifest
        check_counts(self, ConfigError, as_options=False)
        if self.max_input_len > self.max_seq_len:
            raise ConfigError(f"max_input_len ({self.max_input_len}) exceeds max_seq_len "
                              f"({self.max_seq_len}); raise {option('max_seq_len')} or lower "
                              f"{option('max_input_len')}")


@dataclass(frozen=True)
class EngineManifest:
    """Contents of an engine dir's ``config.json``."""

    backend: str  # one of BACKENDS
    backend_version: dict[str, str]  # library name -> version it was built with
    targets: tuple[str, ...]  # compute capabilities ("sm86", ...) or ("cpu",)
    decoder: DecoderConfig
    mapping: Mapping
    dtype: str
    limits: BuildLimits
    rank_files: dict[int, tuple[str, ...]]  # rank -> its files, in load (chain) order
    checksums: dict[str, str]  # file name -> sha256
    # file name -> bytes; None in manifests written before sizes were recorded (presence only)
    sizes: dict[str, int] | None = None
    plugins: dict[str, bool] = field(default_factory=dict)
    quantization: QuantConfig | None = None
    kiln_version: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    # built with --gather_context_logits: every position's logits can be returned
    # (prompt_logprobs, kiln eval); False in manifests written before the flag existed
    gather_context_logits: bool = False
    # built with --weight_only_int8_compute (onnx MatMulNBits with int8 activation blocks)
    weight_only_int8_compute: bool = False
    # the other files the build wrote beside the manifest (tokenizer files): name -> sha256, so
    # that --overwrite and the build cache can tell them from a user's file of the same name;
    # None in manifests written before kiln recorded them
    other_files: dict[str, str] | None = None
    format_version: int = ENGINE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, found {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, found {self.dtype!r}")

    def full_kv_cache_bytes(self) -> int:
        """Keys and values of every layer for ``max_batch_size`` sequences of ``max_seq_len``
        tokens, in the cache's dtype: what the onnx and tensorrt executors allocate, and the
        most a torch engine's paged cache holds."""
        cfg, limits = self.decoder, self.limits
        item = 1 if self.quantization is not None and self.quantization.kv_cache_dtype \
            else _DTYPE_BYTES[self.dtype]
        return (2 * cfg.num_layers * limits.max_batch_size * limits.max_seq_len
                * cfg.num_kv_heads * cfg.head_dim * item)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "kiln_version": self.kiln_version,
            "backend": self.backend, "backend_version": self.backend_version,
            "targets": list(self.targets), "dtype": self.dtype,
            "mapping": {"tp_size": self.mapping.tp_size, "pp_size": self.mapping.pp_size},
            "limits": vars(self.limits), "plugins": self.plugins,
            "quantization": None if self.quantization is None else self.quantization.to_dict(),
            "rank_files": {str(r): list(f) for r, f in self.rank_files.items()},
            "checksums": self.checksums,
            "gather_context_logits": self.gather_context_logits,
            "weight_only_int8_compute": self.weight_only_int8_compute,
            **({} if self.sizes is None else {"sizes": self.sizes}),
            **({} if self.other_files is None else {"other_files": self.other_files}),
            "decoder": self.decoder.to_dict(), "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineManifest:
        version = data.get("format_version")
        if version != ENGINE_FORMAT_VERSION:
            raise EngineError(f"engine format_version {version!r} is not supported by this kiln "
                              f"(reads {ENGINE_FORMAT_VERSION}); rebuild with kiln build")
        return cls(
            backend=data["backend"], backend_version=dict(data["backend_version"]),
            targets=tuple(data["targets"]), decoder=DecoderConfig.from_dict(data["decoder"]),
            mapping=Mapping(**data["mapping"]), dtype=data["dtype"],
            limits=BuildLimits(**data["limits"]),
            rank_files={int(r): tuple(f) for r, f in data["rank_files"].items()},
            checksums=dict(data["checksums"]),
            sizes={k: int(v) for k, v in data["sizes"].items()} if "sizes" in data else None,
            plugins=dict(data.get("plugins", {})),
            quantization=QuantConfig.from_dict(data.get("quantization")),
            kiln_version=data.get("kiln_version", ""), source=data.get("source", {}),
            gather_context_logits=_flag(data.get("gather_context_logits", False),
                                        "gather_context_logits"),
            weight_only_int8_compute=_flag(data.get("weight_only_int8_compute", False),
                                           "weight_only_int8_compute"),
            other_files=dict(data["other_files"]) if "other_files" in data else None,
            format_version=version)

    def write(self, engine_dir: Path) -> None:
        """Write ``config.json`` with its own digest (:func:`manifest_edit` checks it)."""
        data = self.to_dict()
        data[DIGEST_KEY] = manifest_digest(data)
        (Path(engine_dir) / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")


def manifest_edit(data: dict[str, Any]) -> str | None:
    """Whether a manifest (``data``: its ``config.json`` as read, :func:`kiln.dirs.read_config`)
    was edited since the build wrote it: the problem, or None. None too for a manifest without
    :data:`DIGEST_KEY` (written before kiln recorded it; a null digest is an edit). The file
    checks cannot catch such an edit: they trust the manifest."""
    if not manifest_edited(data):
        return None
    return (f"{MANIFEST_NAME}: edited since the build (its content no longer matches the digest "
            f"the build recorded in it), and the engine files were built for what it said then: "
            f"restore the build's {MANIFEST_NAME}, or rebuild with kiln build")


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, found {value!r}")
    return value


def read_manifest(engine_dir: str | Path) -> EngineManifest:
    """Read and validate an engine dir's manifest (no engine file is touched)."""
    return read_manifest_data(engine_dir)[0]


def read_manifest_data(engine_dir: str | Path) -> tuple[EngineManifest, dict[str, Any]]:
    """:func:`read_manifest`, and ``config.json`` as parsed (for :func:`manifest_edit`), from
    one read of the file. A file given is named as ``engine_dir`` (``--engine_dir``): every
    engine dir read here is one given so, or a build cache's."""
    path, data = read_config(engine_dir, DirKind.ENGINE, EngineError, name="engine_dir")
    try:
        return EngineManifest.from_dict(data), data
    except (KeyError, TypeError, ValueError) as e:
        raise EngineError(f"{path}: malformed manifest ({malformed(e)}); rebuild with kiln "
                          f"build") from None
    except ConfigError as e:
        raise EngineError(f"{path}: {e}") from None


def rank_file_names(manifest: EngineManifest, ranks: Iterable[int]) -> list[str]:
    """The files the manifest lists for ``ranks``, in rank then load order."""
    return [name for rank in ranks for name in manifest.rank_files.get(rank, ())]


def file_problem(engine_dir: Path, manifest: EngineManifest, name: str, checksum: bool = False,
                 on_block: Callable[[int], object] | None = None) -> str | None:
    """What is wrong with one listed file, or None: missing, a size other than the manifest's,
    and with ``checksum`` a sha256 other than the manifest's (only then is the file read)."""
    path = Path(engine_dir) / name
    if not path.is_file():
        return "missing (listed in the manifest)"
    size, want = path.stat().st_size, (manifest.sizes or {}).get(name)
    if want is not None and size != want:
        return f"{size} bytes, the manifest says {want} (truncated, extended or replaced)"
    digest = manifest.checksums.get(name)
    if checksum and digest is not None and sha256_file(path, on_block) != digest:
        return "checksum mismatch (corrupt or modified)"
    return None


def _raise(engine_dir: Path, name: str, problem: str | None) -> None:
    if problem is not None:
        raise EngineError(f"{Path(engine_dir) / name}: {problem}; rebuild with kiln build")


def check_files(engine_dir: Path, manifest: EngineManifest, ranks: Iterable[int]) -> None:
    """Check the ranks' files are present with the manifest's sizes (no file data is read)."""
    if manifest.sizes is None:
        logger.info("%s: the manifest records no file sizes (built by an older kiln); checking "
                    "presence only (kiln verify checks checksums)", engine_dir)
    for name in rank_file_names(manifest, ranks):
        _raise(engine_dir, name, file_problem(engine_dir, manifest, name))


def verify_checksums(engine_dir: Path, manifest: EngineManifest, ranks: Iterable[int],
                     progress: bool | None = None) -> None:
    """Check the ranks' files against their sha256 checksums (reads every byte).

    ``progress``: a progress bar over the bytes, shown when hashing takes more than a second;
    None shows it on a terminal only.
    """
    from kiln.progress import progress_bar

    names = rank_file_names(manifest, ranks)
    paths = [p for n in names if (p := Path(engine_dir) / n).is_file()]
    total = sum(p.stat().st_size for p in paths)
    logger.info("verifying checksums of %d files (%.1f GB)", len(names), total / 1e9)
    with progress_bar(total=total, unit="B", unit_scale=True, desc="sha256", delay=1.0,
                      show=progress) as bar:
        for name in names:
            _raise(engine_dir, name, file_problem(engine_dir, manifest, name, checksum=True,
                                                  on_block=bar.update))


def verify_files(engine_dir: Path, manifest: EngineManifest, rank: int) -> None:
    """Check a rank's files: present, the manifest's sizes, and their checksums."""
    check_files(engine_dir, manifest, (rank,))
    verify_checksums(engine_dir, manifest, (rank,), progress=False)
