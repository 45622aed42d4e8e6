"""Writing an output directory (kiln checkpoint or engine dir): the existence check, the
atomic rename, and the tokenizer files that make it self-contained."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln.checkpoint import TOKENIZER_FILES
from kiln.errors import OutputExistsError

log = logging.getLogger(__name__)


def check_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not overwrite:
        raise OutputExistsError(f"{output_dir}: already exists; pass --overwrite to replace it")


@contextmanager
def atomic_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside ``target``, renamed onto it only if the body succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise OutputExistsError(f"{target}: appeared while writing it; not replaced")
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(trash / "old")
            tmp.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer(checkpoint_dir: Path, out: Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (checkpoint_dir / name).is_file()]
    for name in copied:
        shutil.copy2(checkpoint_dir / name, out / name)
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        log.warning("%s has no tokenizer files; the engine will need one to run text",
                    checkpoint_dir)
    return copied
