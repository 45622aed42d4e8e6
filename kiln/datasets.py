"""Text datasets for calibration (``kiln quantize``) and evaluation (``kiln eval``).

Contract: :func:`load_texts` turns a source into a :class:`TextDataset` (frozen: ``texts``,
``name``, ``sha256``, ``kind``). Sources, tried in this order:

- a local ``.txt`` file: UTF-8 text (a leading BOM is dropped), split into paragraphs at blank
  lines (a line holding only whitespace counts as blank); each paragraph is one text, stripped
  of surrounding whitespace. ``"\\n\\n".join(texts)`` (:meth:`TextDataset.joined`) gives the one
  stream a perplexity evaluation reads.
- a local ``.jsonl`` file: one JSON object per line with a string ``text``; blank lines are
  skipped; a line that is not an object with a string ``text`` is an error naming the line.
- a local ``.parquet`` file: its ``text`` column (strings; a null is an error naming the row).
- a local directory: every file of the first of the kinds parquet, jsonl, txt that it holds
  (recursively, sorted by relative path), read as above.
- a hub dataset id ``owner/name`` (when no local path of that name exists), optionally
  ``owner/name:GLOB`` to pick files (``Salesforce/wikitext:wikitext-2-raw-v1/test-*``):
  ``huggingface_hub.snapshot_download(repo_type="dataset")`` of its parquet/jsonl/txt files, then
  read as a directory. ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_TOKEN`` apply; the request
  timeout is :data:`HUB_TIMEOUT_S`, so an unreachable hub fails in seconds instead of hanging.

Texts that are empty or whitespace-only are dropped everywhere (wikitext's parquet files have
many); a source with no text left is an error. ``sha256`` is the hex sha256 of the file's bytes;
for a directory, of the lines ``<sha256>  <relative path>`` of its files (``sha256sum``'s
format); for a hub dataset, the commit id of the downloaded revision. Every failure is a
:class:`~kiln.errors.DatasetError`: one line saying what, where and the fix.

Non-goals: the ``datasets`` library (its configs/splits/scripts), streaming, tokenization,
compressed files, other columns than ``text``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kiln.dirs import expand_home, is_hub_id, near_path
from kiln.errors import UNREADABLE_JSON, DatasetError, counted, json_type
from kiln.hashing import sha256_file

log = logging.getLogger(__name__)

KINDS = ("parquet", "jsonl", "txt")  # a directory's files: the first kind it holds
HUB_PATTERNS = tuple(f"*.{kind}" for kind in KINDS)
HUB_TIMEOUT_S = 10.0
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class TextDataset:
    """Texts read from one source (module docstring); ``kind`` is ``txt``, ``jsonl``,
    ``parquet``, ``dir`` or ``hub``."""

    texts: tuple[str, ...]
    name: str  # recorded in results: a file's or directory's name, or the hub id
    sha256: str
    kind: str
    # messages: the path as given (or the hub id); not compared, not recorded
    where: str = field(default="", compare=False)

    @property
    def shown(self) -> str:
        """How messages name the dataset: the path as given, else its name."""
        return self.where or self.name

    def joined(self, separator: str = "\n\n") -> str:
        """All texts as one stream (what a sliding-window perplexity reads)."""
        return separator.join(self.texts)


def load_texts(source: str | Path, name: str = "dataset") -> TextDataset:
    """Read a local file or directory, or a hub dataset (module docstring); ``name``: the
    option it was given as, for errors."""
    text = str(source)
    if not text.strip():
        raise DatasetError("the dataset path is empty; pass a .txt, .jsonl or .parquet file, a "
                           "directory or a hub dataset id (owner/name)")
    path = expand_home(text, name, DatasetError)
    if path.is_file() and not os.path.exists(os.path.expanduser(text)):
        # 'f.txt/' or 'f.txt/.': Path drops them, where open() and cat refuse them (a retest's
        # --eval_dataset english.txt/ had read the file)
        raise DatasetError(f"{text}: treats {path} as a directory (a '/' after it), and it is a "
                           f"file; give the file's path, {path}")
    if path.exists():
        if path.is_dir():
            return _read_dir(path, path.name, "dir", None)
        return _read_file(path)
    repo_id, _, pattern = text.partition(":")
    if is_hub_id(repo_id) and Path(repo_id).suffix.lstrip(".") not in KINDS:
        return _read_hub(repo_id, pattern or None)
    near = near_path(path, dirs_only=False)
    hint = f"did you mean {near}?" if near is not None else "check the path"
    raise DatasetError(f"{text}: no such file or directory (and not a hub dataset id, which has "
                       f"the form owner/name); {hint}")


def _read_file(path: Path) -> TextDataset:
    kind = path.suffix.lower().lstrip(".")
    if kind not in KINDS:
        raise DatasetError(f"{path}: unsupported dataset file type {path.suffix or '(none)'!r}; "
                           f"pass a .txt, .jsonl or .parquet file")
    texts = _texts_of(path, kind, str(path))
    return TextDataset(texts=_non_empty(texts, path), name=path.name, sha256=_sha256(path),
                       kind=kind, where=str(path))


def _read_dir(directory: Path, name: str, kind: str, sha256: str | None) -> TextDataset:
    where = str(directory) if kind == "dir" else name  # messages: the path given, or the hub id
    try:
        files = sorted(p for p in directory.rglob("*") if p.is_file() and not _hidden(p, directory))
    except OSError as e:
        raise DatasetError(f"{directory}: cannot list the directory ({e.strerror or e}); check "
                           f"its permissions") from None
    for file_kind in KINDS:
        chosen = [p for p in files if p.suffix.lower() == f".{file_kind}"]
        if chosen:
            break
    else:
        raise DatasetError(f"{where}: holds no .parquet, .jsonl or .txt file; pass a directory "
                           f"or dataset that has one")
    skipped = [p for p in files if p.suffix.lower().lstrip(".") in KINDS and p not in chosen]
    if skipped:  # a trial's .txt beside a .jsonl had been dropped without a word
        log.warning("dataset %s: reads its %s only (a directory is read as one kind: .parquet, "
                    "else .jsonl, else .txt); not read: %s", where,
                    counted(len(chosen), f".{file_kind} file"),
                    ", ".join(p.relative_to(directory).as_posix() for p in skipped[:5])
                    + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
    texts: list[str] = []
    lines = []
    for file in chosen:
        relative = file.relative_to(directory).as_posix()
        texts.extend(_texts_of(file, file_kind, f"{where}/{relative}"))
        lines.append(f"{_sha256(file)}  {relative}\n")
    if sha256 is None:
        sha256 = hashlib.sha256("".join(lines).encode()).hexdigest()
    log.info("dataset %s: %d %s file(s): %s", name, len(chosen), file_kind,
             ", ".join(p.relative_to(directory).as_posix() for p in chosen))
    return TextDataset(texts=_non_empty(texts, where), name=name, sha256=sha256, kind=kind,
                       where=where)


def _hidden(path: Path, root: Path) -> bool:
    """Files under a dot-directory (the hub cache's ``.cache``, ``.git``) are not data."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _texts_of(path: Path, kind: str, where: str) -> list[str]:
    if kind == "parquet":
        return _parquet_texts(path, where)
    data = _read_text(path, where)
    if kind == "txt":
        return [p.strip() for p in _PARAGRAPH_BREAK.split(data.replace("\r\n", "\n"))]
    return _jsonl_texts(data, where)


def _read_text(path: Path, where: str) -> str:
    if path.exists() and not path.is_file():  # a device through a link: never read it whole
        raise DatasetError(f"{where}: not a regular file (a device, pipe or socket); pass a "
                           f".txt, .jsonl or .parquet file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{where}: cannot read the file ({e.strerror or e}); check the path and "
                           f"its permissions") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatasetError(f"{where}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at line "
                           f"{line}, byte offset {e.start}); convert the file to UTF-8") from None


def _jsonl_texts(data: str, where: str) -> list[str]:
    texts = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UNREADABLE_JSON as e:
            raise DatasetError(f"{where}: line {number} is not valid JSON ({e.msg}, column "
                               f"{e.colno}); each line must be one JSON object") from None
        if not isinstance(record, dict) or "text" not in record:
            found = sorted(record)[:5] if isinstance(record, dict) else type(record).__name__
            raise DatasetError(f"{where}: line {number} has no 'text' key (found {found}); each "
                               f"line must be an object like {{\"text\": \"...\"}}")
        if not isinstance(record["text"], str):
            raise DatasetError(f"{where}: line {number}: 'text' is {json_type(record['text'])}, "
                               f"expected a string")
        texts.append(record["text"])
    return texts


def _parquet_texts(path: Path, where: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise DatasetError(f"{where}: no 'text' column (columns: {', '.join(schema.names)}); "
                               f"pass a file whose texts are in a column named text")
        column = pq.read_table(path, columns=["text"]).column("text")
    except (OSError, pa.ArrowException) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"{where}: cannot read as parquet ({first}); check the file") from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DatasetError(f"{where}: column 'text' has type {column.type}, expected strings")
    texts = column.to_pylist()
    if column.null_count:
        row = texts.index(None)
        raise DatasetError(f"{where}: row {row} of column 'text' is null; drop or fill it")
    return texts


def _non_empty(texts: list[str], where: object) -> tuple[str, ...]:
    kept = tuple(t for t in texts if t.strip())
    if not kept:
        raise DatasetError(f"{where}: holds no text (empty, or only blank texts); pass a dataset "
                           f"with text in it")
    return kept


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the file ({e.strerror or e}); check the path and "
                           f"its permissions") from None


def _read_hub(repo_id: str, pattern: str | None) -> TextDataset:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    patterns = [pattern] if pattern else list(HUB_PATTERNS)
    shown = f"{repo_id}:{pattern}" if pattern else repo_id
    log.info("fetching dataset %s from the Hugging Face hub", shown)
    try:
        local = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns,
                                       etag_timeout=HUB_TIMEOUT_S))
    except LocalEntryNotFoundError:
        why = ("offline (HF_HUB_OFFLINE is set) and it is not in the local cache" if offline else
               "the hub is unreachable and it is not in the local cache")
        fix = "download it where the hub is reachable and pass the file or directory instead"
    except GatedRepoError:
        why, fix = "the dataset is gated", "accept its terms on huggingface.co and set HF_TOKEN"
    except RepositoryNotFoundError:
        why = "the hub has no such dataset (or it is private)"
        fix = "check the id (set HF_TOKEN for a private dataset), or pass a local file"
    except HfHubHTTPError as e:
        why = f"the hub refused the download ({(str(e).splitlines() or [type(e).__name__])[0]})"
        fix = "check the id and HF_TOKEN, or pass a local file"
    except OSError as e:  # a timeout or refused connection that huggingface_hub did not wrap
        why = f"the download failed ({e})"
        fix = "check the network, or pass a local file"
    else:
        # snapshot_download returns <cache>/snapshots/<commit id>: the revision read.
        return _read_dir(local, shown, "hub", local.name)
    raise DatasetError(f"dataset {shown}: no such local path, and the hub cannot provide it: "
                       f"{why}; {fix}")
