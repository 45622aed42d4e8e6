"""``engine_for_model``: an HF checkpoint (dir or hub id) -> a cached engine dir, built once.

Steps: validate the options (nothing is read or written on bad input) -> pick the backend (the
caller's, else :func:`~kiln.build_cache.key.default_backend`) -> identify the source (hash the
files conversion reads, memoized; or resolve the hub revision) -> the key -> under the entry's
shared lock, a complete entry is a hit: one line at the default log level, "using cached
engine ..." -> else, under its exclusive lock: check again (another process may have built it
while this one waited), remove leftovers of killed builds, convert and build into a temporary
dir, write ``entry.json`` last, rename into place -> evict least recently used entries above
``max_cache_size``.

A failed, interrupted (Ctrl-C) or killed build leaves no entry; the temporary dir is removed on
the way out, or by the next build of that entry when the process was killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kiln
from kiln.build_cache.key import (
    FIXED,
    KeyParts,
    SourceId,
    build_part,
    code_digest,
    default_backend,
    identify_source,
    source_dtype,
)
from kiln.build_cache.store import (
    ENGINE_DIR,
    NAME_CHARS,
    EngineCache,
    Entry,
    cache_of,
    damage,
)
from kiln.dir_locks import holding
from kiln.errors import BuildCacheError, CheckpointError, check_path, named_as_flags
from kiln.sizes import size_option, size_text

log = logging.getLogger(__name__)

_HOLD_ATTEMPTS = 3  # cached_engine: lookups of an entry that a prune keeps removing


def engine_for_model(model: str | Path, *, backend: str | None = None, dtype: str = "auto",
                     tp_size: int = 1, pp_size: int = 1, revision: str | None = None,
                     allow_pickle: bool = False, cache_dir: str | Path | None = None,
                     max_cache_size: int | str | None = None, progress: bool = False,
                     check: Callable[[Any, Path], None] | None = None,
                     **build_options: Any) -> Path:
    """The engine dir for HF checkpoint ``model`` (a local dir, or a hub id), from the build
    cache, converted and built there first if no entry matches.

    ``backend``: default torch where torch sees a CUDA GPU, else onnx (logged). ``dtype``,
    ``tp_size``, ``pp_size``, ``revision``, ``allow_pickle``: as ``kiln convert_checkpoint``
    (``dtype`` is the weights' dtype; an onnx CPU engine of a bfloat16 model defaults to
    float32, which ONNX Runtime's CPU provider computes in). ``build_options``: every other
    :class:`~kiln.builder.options.BuildOptions` field by keyword (max_batch_size, max_input_len,
    max_seq_len, max_num_tokens, targets, plugins, max_build_memory, workers,
    allow_long_context, gather_context_logits, weight_only_int8_compute). ``cache_dir``: the
    cache root (default ``$KILN_CACHE_DIR``, else the user's cache dir + ``/kiln``); a str or
    os.PathLike, not empty and not ``"-"`` (as the CLI's; ``"./-"`` names a directory "-").
    ``max_cache_size``: bytes, or a size such as ``"20GB"`` (as ``--max_cache_size``); after a
    build, least recently used entries not in use are evicted until the cache fits.
    ``check``: called on a miss, before converting, with the manifest the build would write
    (:func:`~kiln.build_cache.preflight.planned_manifest`, which runs conversion's and the
    build's own checks first) and the checkpoint directory its tokenizer files come from: a
    caller that runs the engine passes
    :func:`kiln.runtime.loader.check_runnable`'s, so a machine that cannot run it is refused
    before the build (and ``kiln run`` its prompt checks). Raises
    :class:`~kiln.errors.KilnError` subclasses on bad input.
    """
    max_cache_size = size_option("max_cache_size", max_cache_size)  # "20GB", as the flag
    request = request_for(model, backend=backend, dtype=dtype, tp_size=tp_size, pp_size=pp_size,
                          revision=revision, allow_pickle=allow_pickle, cache_dir=cache_dir,
                          **build_options)
    entry, built = _lookup_or_build(request, progress, check)
    if not built:
        # the key is the files' content: an entry another path's identical files built is
        # named as such (a trial read its other path as this model's)
        origin = entry.source if entry.source == request.source.label else \
            f"from identical files at {entry.source}"
        log.warning("using cached engine %s (%s; %s, built %s ago)", entry.engine_dir,
                    request.what, origin, _age(time.time() - entry.created))
    elif max_cache_size is not None:
        _evict(request.cache, max_cache_size, entry)
    return entry.engine_dir


@dataclass(frozen=True)
class Request:
    """One call's validated inputs: where, what source, the key's parts, the build options."""

    cache: EngineCache
    source: SourceId
    parts: KeyParts
    build: Any  # BuildOptions, targets resolved
    what: str  # "onnx, the default on a machine without a CUDA GPU"

    @property
    def key(self) -> str:
        return self.parts.key()

    @property
    def name(self) -> str:
        return self.key[:NAME_CHARS]


# engine_for_model's own keywords (the rest are BuildOptions fields)
_OWN = tuple(name for name, p in inspect.signature(engine_for_model).parameters.items()
             if p.kind is p.KEYWORD_ONLY)


def request_for(model: str | Path, *, backend: str | None = None, dtype: str = "auto",
                tp_size: int = 1, pp_size: int = 1, revision: str | None = None,
                allow_pickle: bool = False, cache_dir: str | Path | None = None,
                **build_options: Any) -> Request:
    """Validate the options (before anything is read or written), pick the backend, identify
    the source and make the key's parts: everything but the lookup."""
    from kiln.builder.options import BuildOptions
    from kiln.config import options_from
    from kiln.converters.options import ConvertOptions

    check_path("model", model, CheckpointError, "pass an HF checkpoint directory or hub id",
               flag="model_dir")  # LLM(model=...) is --model_dir
    convert = ConvertOptions(dtype=dtype, tp_size=tp_size, pp_size=pp_size, revision=revision,
                             allow_pickle=allow_pickle)
    build = options_from(BuildOptions, build_options, "engine_for_model", also=_OWN, **FIXED,
                         backend=backend or "onnx")
    cache = EngineCache(cache_dir)
    cache.check_dir()
    cache.check_placement()
    with contextlib.suppress(BuildCacheError):  # read-only: its entries still serve; a build
        cache.ensure()  # calls it again and refuses
    why = None
    if backend is None:
        backend, why = default_backend()
        build = dataclasses.replace(build, backend=backend)
    source = identify_source(str(model), revision, allow_pickle, cache.dir)
    parts, build = key_parts(source, convert, build)
    # a tensorrt engine's targets are its GPUs (retest 44c: they had gone unsaid)
    targets = f" for {','.join(build.targets)}" if backend == "tensorrt" else ""
    what = f"{backend}{targets}{f', {why}' if why else ''}"
    if convert.dtype == "auto" and parts.convert["dtype"] != "auto":  # resolve_dtype's float32
        # (said in the building and cache-hit lines: a retest's bfloat16 model had been built in
        # float32, twice its weights' memory, with a word at INFO only)
        what += f"; {parts.convert['dtype']}, {ONNX_FLOAT32}"
    return Request(cache, source, parts, build, what)


@contextlib.contextmanager
def hold_engine(engine_dir: str | Path, cache_dir: str | Path | None = None) -> Iterator[Path]:
    """Use ``engine_dir`` in the body with its cache entry kept from ``kiln cache prune`` and
    eviction (a shared lock, released on exit or when the process dies), and the directory
    itself from ``--overwrite`` (:func:`kiln.dir_locks.holding`: an engine dir outside any
    cache too). Without ``cache_dir``, the cache is the one the engine dir lies in, whatever
    its root."""
    cache = EngineCache(cache_dir) if cache_dir is not None else cache_of(engine_dir)
    with (cache or EngineCache()).hold(engine_dir) as path, holding(path):
        yield path


def option_names() -> frozenset[str]:
    """Every keyword :func:`engine_for_model` takes (its own and BuildOptions' fields that a
    caller may set)."""
    from kiln.builder.options import BuildOptions

    fields = {f.name for f in dataclasses.fields(BuildOptions)} - set(FIXED)
    return frozenset(fields | set(_OWN))


def check_option_names(options: dict[str, Any], caller: str,
                       sets_itself: tuple[str, ...] = ()) -> None:
    """A :class:`~kiln.errors.ConfigError` naming ``caller`` (e.g. ``"LLM"``, which passes its
    keywords on to :func:`engine_for_model`) for any keyword engine_for_model does not take,
    or one of ``sets_itself`` (what the caller passes on its own)."""
    from kiln.builder.options import BuildOptions
    from kiln.config import options_from

    own = tuple(name for name in _OWN if name not in sets_itself)
    options_from(BuildOptions, {k: v for k, v in options.items() if k not in own}, caller,
                 also=own, **FIXED, backend="onnx")


@contextlib.contextmanager
def cached_engine(model: str | Path, *, cache_dir: str | Path | None = None,
                  **options: Any) -> Iterator[Path]:
    """:func:`engine_for_model`'s engine dir (same arguments), held for the body as
    :func:`hold_engine` holds it: what ``--model_dir`` and ``LLM(model=...)`` run. An entry
    pruned between the lookup and the hold is looked up (so rebuilt) again."""
    cache = EngineCache(cache_dir)
    for _ in range(_HOLD_ATTEMPTS):
        engine_dir = engine_for_model(model, cache_dir=cache_dir, **options)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(cache.hold(engine_dir))
            except BuildCacheError:
                if cache.read(engine_dir.parent.name) is not None:
                    raise
                continue  # pruned since the lookup
            yield engine_dir
            return
    raise BuildCacheError(f"{model}: its cached engine was removed {_HOLD_ATTEMPTS} times "
                          f"(kiln cache prune) before it could be used; let the prune finish, "
                          f"then try again")


def key_parts(source: SourceId, convert: Any, build: Any) -> tuple[KeyParts, Any]:
    """The key's parts for these validated options, and ``build`` with its targets resolved
    (the backend's default targets on this machine when none were given)."""
    from kiln.builder.backends import get_backend
    from kiln.builder.options import canonical

    engine = get_backend(build.backend)  # EngineError if it cannot be used here
    dtype = resolve_dtype(convert.dtype, build, source)
    targets = tuple(build.targets) or tuple(engine.default_targets(dtype))
    build = dataclasses.replace(build, targets=targets)
    if any((build.max_seq_len, build.max_input_len, build.max_num_tokens,
            build.allow_long_context)):
        build = canonical(build, _max_positions(source))
    parts = KeyParts(
        source=source.key,
        kiln={"version": kiln.__version__, "code": code_digest()},
        convert={"dtype": dtype, "tp_size": convert.tp_size, "pp_size": convert.pp_size,
                 "allow_pickle": convert.allow_pickle},
        backend=build.backend, backend_versions=dict(engine.versions()), targets=targets,
        build=build_part(build))
    return parts, build


def _max_positions(source: SourceId) -> int:
    """The source's max_position_embeddings, as its converter reads it."""
    from kiln.converters.base import converter_for, reading_config
    from kiln.dirs import DirKind, read_config
    from kiln.errors import CheckpointError

    where, hf = read_config(source.directory, DirKind.HF_CHECKPOINT, CheckpointError)
    with reading_config(where):  # its errors name it
        return converter_for(hf).max_positions(hf)


ONNX_FLOAT32 = "as ONNX Runtime's CPU provider computes a bfloat16 model's onnx engine"


def resolve_dtype(dtype: str, build: Any, source: SourceId) -> str:
    """``dtype`` as asked; ``auto`` is the source's, except that an onnx engine of a bfloat16
    model gets float32 (ONNX Runtime's CPU provider, which builds every onnx engine, has no
    bfloat16 MatMul, and float16 runs slowly there)."""
    onnx = build.backend == "onnx"
    own = source_dtype(source.directory)
    if dtype != "auto":
        # the model's own dtype, where auto keeps it, is auto's engine (a trial's --dtype
        # float32 of a float32 model had built a second one)
        return "auto" if dtype == own and not (onnx and own == "bfloat16") else dtype
    if onnx and own == "bfloat16":  # (request_for says so)
        return "float32"
    return "auto"


def _lookup_or_build(request: Request, progress: bool,
                     check: Callable[[Any, Path], None] | None) -> tuple[Entry, bool]:
    cache, name, key = request.cache, request.name, request.key

    def waiting() -> None:
        log.warning("waiting for another kiln process that builds or uses this engine (%s)",
                    cache.dir / name)

    if (cache.dir / name).is_dir():  # else a miss, even where the cache cannot be written
        with cache.locked(name, write=False, on_wait=waiting):  # taken: a build (or prune) runs
            entry = _usable(cache, name, key)
            if entry is not None:
                cache.touch(entry)
                return entry, False
    conversion = _preflight(request, check)
    cache.ensure()  # a read-only cache: one line, before anything else is written
    with cache.locked(name, write=True, on_wait=waiting):
        try:
            entry = _usable(cache, name, key, repair=True)
            if entry is not None:  # built by the process this one waited for
                cache.touch(entry)
                return entry, False
            cache.clear_leftovers(name)
            entry = _build(request, conversion, progress)
        finally:
            cache.drop_lock(name)  # a failed build: no lock file left behind (store.py)
    log.info("built cached engine %s in %.1f s", entry.engine_dir, entry.build_seconds)
    return entry, True


def _preflight(request: Request, check: Callable[[Any, Path], None] | None) -> Any:
    """A miss: refuse, before the 'building' line, what conversion, the build or ``check``
    would refuse (:mod:`kiln.build_cache.preflight`); the conversion's plan."""
    from kiln.build_cache.preflight import planned_manifest

    conversion, manifest = planned_manifest(request.source, request.parts, request.build)
    if check is not None:
        check(manifest, request.source.directory)
    return conversion


def _build(request: Request, conversion: Any, progress: bool) -> Entry:
    """Convert and build into a temporary dir and install it (the caller holds the write
    lock); the temporary dir is gone on the way out, whatever happens."""
    cache, name, key, source = request.cache, request.name, request.key, request.source
    log.warning("building the engine for %s (%s) into the build cache %s; later calls "
                "with the same inputs reuse it", source.label, request.what, cache.dir)
    started = time.time()
    tmp = None
    try:
        tmp = cache.new_tmp(name)
        _convert_and_build(tmp, request, conversion, progress)
        return cache.install(tmp, name, {
            "key": key, "parts": request.parts.to_dict(), "source": source.label,
            "backend": request.build.backend, "created": started,
            "build_seconds": round(time.time() - started, 3),
            "kiln_version": kiln.__version__})
    except OSError as e:  # (the checkpoint's and the engine's atomic_dir: an OutputError)
        from kiln.output_dirs import disk_full

        if (full := disk_full(e)) is None:
            raise
        other = "set KILN_CACHE_DIR (or --cache_dir) to another directory" if named_as_flags() \
            else "pass another cache_dir (or set KILN_CACHE_DIR)"
        raise BuildCacheError(f"{cache.dir / name}: the build cache entry cannot be written "
                              f"({full.strerror}); nothing was left half-written: free space "
                              f"on its file system, or {other}") from e
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _usable(cache: EngineCache, name: str, key: str, repair: bool = False) -> Entry | None:
    """The complete, undamaged entry ``name`` for ``key``, else None. With ``repair`` (under the
    write lock) a damaged entry of the cache is removed; something else in the way is refused."""
    path = cache.dir / name
    entry = cache.read(name)
    if entry is None:
        if repair and (path.exists() or path.is_symlink()):
            raise BuildCacheError(f"{path}: is in the way of a build cache entry and was not made "
                                  f"by the cache (no valid entry.json); move it away")
        return None
    problem = "another key has this entry's name" if entry.key != key else \
        damage(entry.engine_dir)
    if problem is None:
        return entry
    if repair:
        if foreign := cache.foreign_content(entry):  # said before any word of a rebuild
            raise BuildCacheError(f"the cached engine {entry.engine_dir} is damaged ({problem}) "
                                  f"and is not rebuilt, as {foreign}; move that away and it "
                                  f"is, or delete the entry {entry.path} yourself")
        log.warning("the cached engine %s is damaged (%s); rebuilding it", entry.engine_dir,
                    problem)
        cache.remove(entry)
    return None


def _convert_and_build(tmp: Path, request: Request, conversion: Any, progress: bool) -> None:
    """Convert (the preflight's plan) into ``tmp/checkpoint``, build ``tmp/engine``, drop the
    checkpoint."""
    from kiln.builder import build as build_engine
    from kiln.converters.convert import write_checkpoint
    from kiln.engine import read_manifest

    checkpoint = tmp / "checkpoint"
    write_checkpoint(conversion, checkpoint, progress=progress)
    build = request.build
    options = {f.name: getattr(build, f.name) for f in dataclasses.fields(build)
               if f.name not in FIXED}
    build_engine(checkpoint, tmp / ENGINE_DIR, progress=progress, **options)
    shutil.rmtree(checkpoint)
    # The manifest names the checkpoint it was built from: a temporary dir, now gone.
    manifest = read_manifest(tmp / ENGINE_DIR)
    source_record = {**manifest.source, "checkpoint_dir": None, "build_cache_key": request.key}
    dataclasses.replace(manifest, source=source_record).write(tmp / ENGINE_DIR)


def _evict(cache: EngineCache, max_size: int, keep: Entry) -> None:
    result = cache.prune(max_size=max_size, keep=(keep.name,))
    if result.removed:
        count = len(result.removed)
        log.warning("evicted %d least recently used cached engine%s (%s) to keep the build "
                    "cache under %s", count, "s" if count != 1 else "",
                    size_text(result.freed, "si"), size_text(max_size, "si"))
    for _, why in result.refused:
        log.warning("not evicted: %s", why)
    total = result.remaining  # measured by prune: the entries are not walked again
    if total > max_size:  # what is left is in use, holds a user's file, or was just built
        kept = ["the engine just built"]
        if result.in_use:
            kept.append(f"{len(result.in_use)} in use")
        if result.refused:
            kept.append(f"{len(result.refused)} holding files the cache did not write")
        then = ("kiln cache prune --max_size frees the rest once they are done"
                if result.in_use else "the limit is below what must be kept")
        log.warning("the build cache holds %s, over its limit of %s: %s %s kept; %s",
                    size_text(total, "si"), size_text(max_size, "si"), " and ".join(kept),
                    "are" if len(kept) > 1 else "is", then)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"
