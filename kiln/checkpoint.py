"""The kiln checkpoint format: ``config.json`` + ``rank{N}.safetensors`` (+ tokenizer files).

See docs/checkpoint.md for the full description. This module owns the format: the
``config.json`` schema (:class:`CheckpointConfig`), file names, and loading a checkpoint back
(per rank, or all ranks merged into full tensors for the reference decoder).
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event
from typing import Any

import torch

from kiln.config import DTYPES, DecoderConfig, Mapping
from kiln.dirs import DirKind, read_config
from kiln.errors import CheckpointError, ConfigError, KilnError, counted, malformed
from kiln.hashing import (
    DIGEST_KEY,
    manifest_digest,
    manifest_edited,
    other_file_problems,
    sha256_file,
    stops_when,
)
from kiln.quantization.config import QuantConfig
from kiln.roles import (
    expected_shape,
    name_mismatch,
    parse_tensor,
    quantized_roles,
    tensor_names,
)
from kiln.sharding import shard_shape, unshard_named
from kiln.tensorio import TensorInfo, all_finite, first_non_finite, read_header, read_tensor

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json",
)
# the end of a damaged rank file's message (read_header's remedy)
REWRITE = "write the checkpoint again (kiln convert_checkpoint; kiln quantize for a quantized " \
          "one), or copy it again"


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


@dataclass(frozen=True)
class CheckpointConfig:
    """The contents of a kiln checkpoint's ``config.json``."""

    decoder: DecoderConfig
    mapping: Mapping
    dtype: str
    quantization: QuantConfig | None = None
    source: dict[str, Any] = field(default_factory=dict)
    kiln_version: str = ""
    # the other files written beside config.json (tokenizer files, kiln quantize's
    # accuracy.json): name -> sha256, so that --overwrite can tell them from a user's file of
    # the same name; None in checkpoints written before kiln recorded them
    other_files: dict[str, str] | None = None
    # rank file name -> sha256, recorded by the writer (kiln convert_checkpoint, kiln quantize)
    # and checked by kiln build, which refuses a file changed or damaged since (a bad copy, a
    # disk error); None in checkpoints written before kiln recorded them
    rank_checksums: dict[str, str] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, found {self.dtype!r}")
        self.mapping.validate_for(self.decoder)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def rank_tensor_names(self, rank: int) -> list[str]:
        """Canonical names stored in ``rank{rank}.safetensors``."""
        _, pp_rank = self.mapping.coords(rank)
        layers = self.mapping.stage_layers(pp_rank, self.decoder.num_layers)
        return tensor_names(self.decoder, layers, first_stage=pp_rank == 0,
                            last_stage=pp_rank == self.mapping.pp_size - 1,
                            quant=self.quantization)

    def to_dict(self) -> dict[str, Any]:
        """config.json's content, with its own digest (:data:`~kiln.hashing.DIGEST_KEY`): an
        edit since is told from what kiln wrote (kiln verify; --overwrite keeps it)."""
        data = {
            "format_version": self.format_version,
            "kiln_version": self.kiln_version,
            "decoder": self.decoder.to_dict(),
            "mapping": {"tp_size": self.mapping.tp_size, "pp_size": self.mapping.pp_size},
            "dtype": self.dtype,
            "quantization": None if self.quantization is None else self.quantization.to_dict(),
            "source": self.source,
            **({} if self.other_files is None else {"other_files": self.other_files}),
            **({} if self.rank_checksums is None else {"rank_checksums": self.rank_checksums}),
        }
        return {**data, DIGEST_KEY: manifest_digest(data)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = CONFIG_NAME) -> CheckpointConfig:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{where}: format_version {version!r} is not supported by this "
                                  f"kiln (reads {FORMAT_VERSION}); re-run kiln convert_checkpoint")
        try:
            return cls(decoder=DecoderConfig.from_dict(data["decoder"]),
                       mapping=Mapping(**data["mapping"]), dtype=data["dtype"],
                       quantization=QuantConfig.from_dict(data.get("quantization")),
                       source=data.get("source", {}), kiln_version=data.get("kiln_version", ""),
                       other_files=dict(data["other_files"]) if "other_files" in data else None,
                       rank_checksums=_rank_checksums(data["rank_checksums"],
                                                      Mapping(**data["mapping"]))
                       if "rank_checksums" in data else None,
                       format_version=version)
        except (KeyError, TypeError, KilnError, ValueError) as e:
            problem = malformed(e) if isinstance(e, (KeyError, TypeError)) else str(e)
            if manifest_edited(data):  # the edit is the cause: a trial's tp_size 2 -> 1 had
                # been told to remove rank_checksums, which then disagreed with the mapping
                raise CheckpointError(f"{where}: edited since kiln wrote it (it no longer "
                                      f"matches the digest recorded in it), and as edited: "
                                      f"{problem.partition('; ')[0]}; undo the edit") from None
            if isinstance(e, (KeyError, TypeError)):
                raise CheckpointError(f"{where}: {problem}; not a kiln checkpoint config as "
                                      f"kiln writes it: undo the edit, or re-run kiln "
                                      f"convert_checkpoint") from None
            raise CheckpointError(f"{where}: {problem}") from None


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _rank_checksums(value: Any, mapping: Mapping) -> dict[str, str]:
    """config.json's ``rank_checksums``, checked: every rank file of the mapping and no other,
    each a sha256 hex digest (either case; kept in lower case)."""
    names = [rank_file(rank) for rank in range(mapping.world_size)]
    fix = "write the checkpoint again, or remove the key to build it unchecked"
    if not isinstance(value, dict) or not all(
            isinstance(v, str) and _SHA256.fullmatch(v.lower()) for v in value.values()):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(f"rank_checksums must map each rank file to its sha256 (64 hex "
                         f"digits), found {shown}; {fix}")
    if sorted(value) != names:
        raise ValueError(f"rank_checksums lists {', '.join(sorted(value)) or 'no file'}, and "
                         f"the mapping's rank files are {', '.join(names)}; {fix}")
    return {name: value[name].lower() for name in names}


def hash_rank_files(directory: Path, world_size: int,
                    stop: Event | None = None) -> dict[str, str]:
    """sha256 of each rank file in ``directory`` (:attr:`CheckpointConfig.rank_checksums`), a
    thread a file (hashlib releases the GIL); the threads stop within a block once ``stop``
    is set or the caller is interrupted."""
    names = [rank_file(rank) for rank in range(world_size)]
    stop = stop or Event()
    with ThreadPoolExecutor(min(len(names), 4)) as pool:
        try:
            hashes = {name: pool.submit(sha256_file, directory / name, stops_when(stop))
                      for name in names}
            return {name: future.result() for name, future in hashes.items()}
        finally:
            stop.set()  # (the pool's exit waits for its threads)


def written_by(config: CheckpointConfig) -> str:
    """The kiln command that wrote a checkpoint of ``config``."""
    return "kiln quantize" if "quantized_from" in config.source else "kiln convert_checkpoint"


def check_other_files(directory: Path, config: CheckpointConfig) -> None:
    """Raise :class:`CheckpointError` for the first file kiln wrote beside the rank files
    (the tokenizer files, ``config.other_files``) that is gone or changed since: kiln build and
    kiln quantize copy them into what they write, where the damage would pass for theirs (a
    trial's truncated tokenizer.json went through both; kiln verify then passed the copy, and
    only kiln run failed). A checkpoint of an older kiln records none: nothing to check."""
    writer = written_by(config)
    problems = other_file_problems(directory, config.other_files, writer, f"{writer} wrote it",
                                   "config.json's")
    if problems:
        raise CheckpointError(f"{directory / problems[0]}; copy the checkpoint again, or write "
                              f"it again with {writer}")


def check_rank_checksums(directory: Path, config: CheckpointConfig,
                         hashes: dict[str, str]) -> None:
    """Raise :class:`CheckpointError` naming the first rank file whose sha256 (``hashes``) is
    not the one ``config`` recorded."""
    recorded = config.rank_checksums or {}
    for name, digest in hashes.items():
        if digest == recorded.get(name):
            continue
        writer = written_by(config)
        other = next((n for n, d in recorded.items() if d == digest), None)
        if other is not None:
            raise CheckpointError(f"{directory / name}: holds the bytes {writer} wrote to "
                                  f"{other} (rank files copied over each other); copy the "
                                  f"checkpoint again, or write it again")
        raise CheckpointError(f"{directory / name}: its bytes are not those {writer} wrote "
                              f"(sha256 {digest[:12]}..., recorded {recorded.get(name, '')[:12]}"
                              f"...): the file was changed or damaged since; copy it again, "
                              f"or write the checkpoint again")


@contextmanager
def rank_files_checked(directory: Path, config: CheckpointConfig,
                       ) -> Iterator[Callable[..., None]]:
    """Hash a checkpoint's rank files in a thread beside the work that reads them (kiln build,
    kiln quantize); the check yielded waits for the hashes and raises
    :func:`check_rank_checksums`'s error (a checkpoint that records none is not checked, said
    at INFO); ``check(wait=False)`` checks only if the hashes are done (a long job calls it
    as it goes, to stop at a damaged file without finishing its work first). The thread stops
    within a block when the work ends first (an error, Ctrl-C)."""
    directory = Path(directory)
    if config.rank_checksums is None:
        log.info("%s records no rank file checksums (written by a kiln before they were "
                 "recorded, or the key removed): its rank files are not checked", directory)
        yield lambda wait=True: None
        return
    stop = Event()
    checked = False

    def check(wait: bool = True) -> None:
        nonlocal checked
        if checked or not (wait or hashes.done()):
            return
        check_rank_checksums(directory, config, hashes.result())
        checked = True
        log.info("%s: %s match the sha256 recorded", directory,
                 counted(config.mapping.world_size, "rank file"))

    with ThreadPoolExecutor(1) as pool:
        hashes = pool.submit(hash_rank_files, directory, config.mapping.world_size, stop)
        try:
            yield check
        finally:
            stop.set()


def load_config(checkpoint_dir: str | Path, name: str | None = None) -> CheckpointConfig:
    """Read and validate ``checkpoint_dir/config.json``; an edit since kiln wrote it (its
    recorded digest, :data:`~kiln.hashing.DIGEST_KEY`) is said at WARNING, and the config is
    taken as it reads now (build and quantize had read one without comment). ``name``: the
    option ``checkpoint_dir`` was given as (:func:`kiln.dirs.read_config`)."""
    path, data = read_config(checkpoint_dir, DirKind.KILN_CHECKPOINT, CheckpointError, name)
    config = CheckpointConfig.from_dict(data, str(path))
    if manifest_edited(data):
        log.warning("%s: edited since kiln wrote it (it no longer matches the digest recorded "
                    "in it); read as it is now. kiln verify %s says whether the rest is as kiln "
                    "wrote it; to keep an edit made on purpose, remove %s from it", path,
                    shlex.quote(str(checkpoint_dir)), DIGEST_KEY)
    return config


def read_checked(name: str, info: TensorInfo, rows: tuple[int, int] | None = None,
                 ) -> torch.Tensor:
    """Tensor ``name`` of a checkpoint's rank file (rows ``[start, stop)`` of it if given), as
    :func:`~kiln.tensorio.read_tensor` reads it, refused if it holds NaN or inf: kiln writes
    none (convert refuses them), so one is damage, named here where no checksums say so (a
    checkpoint of an older kiln) rather than later as a NaN perplexity or NaN logits."""
    t = read_tensor(info, rows)
    if not all_finite(t):
        first = (rows[0] if rows else 0) + (first_non_finite(t) or 0)
        raise CheckpointError(f"{info.path}: {name} holds NaN/Inf values (first at "
                              f"{'row' if t.dim() > 1 else 'element'} {first}); the file is "
                              f"damaged: {REWRITE}")
    return t


def wider_dtypes(dtype: torch.dtype) -> list[str]:
    """kiln's dtypes whose range holds more than ``dtype``'s, narrowest first (the advice of
    an overflow: convert's and the build's)."""
    limit = torch.finfo(dtype).max
    return sorted((d for d in DTYPES if torch.finfo(getattr(torch, d)).max > limit),
                  key=lambda d: torch.finfo(getattr(torch, d)).max)


def cast_checked(name: str, info: TensorInfo, tensor: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """Tensor ``name`` of a rank file (read by :func:`read_checked`: finite) cast to a build's
    ``dtype``, refused if the cast turned a value inf: a float32 or bfloat16 checkpoint's
    values beyond float16's 65,504 had built, at ``--dtype float16``, into an engine of inf
    weights that only a run told of (NaN logits), and ``kiln verify`` passed."""
    cast = tensor.to(dtype)
    if cast.dtype == tensor.dtype or not cast.is_floating_point() or all_finite(cast):
        return cast
    limit = torch.finfo(dtype).max
    wider = wider_dtypes(dtype)[::-1]  # float32 first
    note = " (onnx engines take no bfloat16)" if "bfloat16" in wider else ""
    raise CheckpointError(f"{info.path}: {name} overflows {str(dtype).removeprefix('torch.')}: "
                          f"values beyond +-{limit:.4g} (first at "
                          f"{'row' if cast.dim() > 1 else 'element'} {first_non_finite(cast)}) "
                          f"become inf; build with --dtype {' or '.join(wider)}{note}")


def load_rank(checkpoint_dir: str | Path, rank: int, config: CheckpointConfig | None = None,
              names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one rank (only those in ``names`` if given), checked against the names
    the config implies."""
    checkpoint_dir = Path(checkpoint_dir)
    config = config or load_config(checkpoint_dir)
    path = existing_rank_file(checkpoint_dir, config, rank)
    infos, _ = read_header(path, REWRITE)
    check_tensor_names(path, config, rank, infos)
    return {name: read_checked(name, info) for name, info in infos.items()
            if names is None or name in names}


def existing_rank_file(checkpoint_dir: Path, config: CheckpointConfig, rank: int) -> Path:
    """Rank ``rank``'s file of the checkpoint; CheckpointError if it is missing."""
    path = Path(checkpoint_dir) / rank_file(rank)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the mapping has "
                              f"{counted(config.mapping.world_size, 'rank')}); re-run kiln "
                              f"convert_checkpoint")
    return path


def check_tensor_names(path: Path, config: CheckpointConfig, rank: int,
                       found: Collection[str]) -> None:
    """Raise CheckpointError when rank ``rank``'s file ``path`` does not hold exactly the tensors
    ``config`` implies; a KV-cache record without its scales (or the reverse) is named as such."""
    expected = set(config.rank_tensor_names(rank))
    missing, unexpected = sorted(expected - set(found)), sorted(set(found) - expected)
    if not (missing or unexpected):
        return
    kv = config.quantization.kv_cache_dtype if config.quantization is not None else None
    if missing and not unexpected and all(n.endswith(("k_scale", "v_scale")) for n in missing):
        raise CheckpointError(f"{path}: config.json records kv_cache_dtype {kv}, but the "
                              f"checkpoint has no KV-cache scales ({missing[0]} and "
                              f"{len(missing) - 1} more); quantize again with kiln quantize "
                              f"--kv_cache_dtype {kv}, or remove kv_cache_dtype from config.json")
    if unexpected and not missing and all(n.endswith(("k_scale", "v_scale")) for n in unexpected):
        raise CheckpointError(f"{path}: the checkpoint holds KV-cache scales ({unexpected[0]} and "
                              f"{len(unexpected) - 1} more) that config.json does not record "
                              f"(no kv_cache_dtype); use the config.json kiln quantize wrote")
    raise CheckpointError(f"{path}: tensors do not match config.json: "
                          f"{name_mismatch(expected, found)}; re-run kiln "
                          f"convert_checkpoint (and kiln quantize, for a quantized checkpoint)")


def check_tensor_shapes(path: Path, config: CheckpointConfig, rank: int,
                        shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError where a float tensor of rank ``rank``'s file ``path`` has another
    shape than ``config`` implies (a trial's config.json edited to hidden_size 96 over 64-wide
    weights built, verified and ran, the manifest recording 96). Quantized weights and their
    companions (packed shapes, checked by the quantized formats' own checks) are skipped."""
    quantized = set(quantized_roles(config.quantization))
    tp_rank, _ = config.mapping.coords(rank)
    for name, shape in sorted(shapes.items()):
        role, _, kind = parse_tensor(name)
        if kind is not None or role in quantized:
            continue
        want = shard_shape(expected_shape(role, config.decoder), role, config.decoder,
                           config.mapping, tp_rank)
        if tuple(shape) != want:
            d = config.decoder
            raise CheckpointError(f"{path}: {name} is {list(shape)}, where config.json implies "
                                  f"{list(want)} (hidden_size {d.hidden_size}, "
                                  f"intermediate_size {d.intermediate_size}, vocab_size "
                                  f"{d.vocab_size}, tp {config.mapping.tp_size}): config.json "
                                  f"was edited or belongs to another checkpoint; re-run kiln "
                                  f"convert_checkpoint")


def check_rank_header(path: Path, config: CheckpointConfig, rank: int,
                      infos: dict[str, TensorInfo]) -> None:
    """What a build checks of rank ``rank``'s file from its header, before reading a tensor:
    the tensor names and float shapes ``config`` implies (kiln build, kiln quantize and
    kiln verify check the same)."""
    check_tensor_names(path, config, rank, infos)
    check_tensor_shapes(path, config, rank, {name: info.shape for name, info in infos.items()})


def check_tensor_dtypes(path: Path, config: CheckpointConfig,
                        infos: dict[str, TensorInfo]) -> None:
    """Raise CheckpointError where a float tensor of an unquantized checkpoint is not stored in
    the dtype its config.json records, which kiln quantize writes it back in (a trial's
    dtype edited to float16 over float32 tensors had been a traceback; a build casts)."""
    if config.quantization is not None:
        return
    for name, info in sorted(infos.items()):
        if info.dtype.is_floating_point and info.dtype != getattr(torch, config.dtype):
            raise CheckpointError(f"{path}: {name} is {str(info.dtype).removeprefix('torch.')}, "
                                  f"and config.json says dtype {config.dtype}: config.json was "
                                  f"edited or belongs to another checkpoint; re-run kiln "
                                  f"convert_checkpoint")


def load_merged(checkpoint_dir: str | Path, config: CheckpointConfig | None = None,
                names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Every canonical tensor of the whole model (only those in ``names`` if given: one
    layer's, for layer-by-layer calibration), ranks and stages merged (for the oracle)."""
    config = config or load_config(checkpoint_dir)
    mapping = config.mapping
    per_name: dict[str, list[torch.Tensor | None]] = {}
    for rank in range(mapping.world_size):
        tp_rank, _ = mapping.coords(rank)
        for name, tensor in load_rank(checkpoint_dir, rank, config, names).items():
            per_name.setdefault(name, [None] * mapping.tp_size)[tp_rank] = tensor
    return {name: unshard_named(name, shards, config.decoder, mapping)
            for name, shards in per_name.items()}
