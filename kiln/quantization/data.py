"""Calibration and evaluation tokens: text -> the checkpoint's tokenizer -> fixed-length samples.

Contract: :func:`token_samples` encodes a :class:`~kiln.datasets.TextDataset`'s texts joined by a
blank line as ``TextDataset.joined`` does, as one string (``kiln eval``'s tokens, without
special tokens), reading no more texts than it needs, and cuts the stream into consecutive,
non-overlapping samples of ``seq_length`` tokens (a trailing partial sample is dropped).
:func:`split_calibration` takes the first ``calib_size`` samples for calibration and the next
``held_out(calib_size)`` (a quarter as many: a fifth of the tokens read) for the accuracy gate,
so the gate never sees a token calibration saw. Too little text is a
:class:`~kiln.errors.DatasetError` saying how many tokens there are and what would fix it.
:func:`shared_lines` tells how much of an ``--eval_dataset`` the calibration text holds too (its
lines compared with whitespace normalised), for the warning that such a gate flatters.

Non-goals: packing with attention masks, padding, sampling samples at random offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.datasets import TextDataset
from kiln.errors import DatasetError, counted, option

log = logging.getLogger(__name__)
SEPARATOR = "\n\n"
# a shorter line (whitespace normalised) is no evidence of shared text: headings, "Returns:",
# list markers and the like recur in unrelated texts
MIN_SHARED_CHARS = 32


class TooFewTokens(DatasetError):
    """A text too short for the samples asked of it; ``tokens``: the tokens it has."""

    def __init__(self, message: str, tokens: int):
        super().__init__(message)
        self.tokens = tokens


def held_out(calib_size: int) -> int:
    """Samples after the calibration samples kept for the accuracy gate (a quarter as many)."""
    return max(1, -(-calib_size // 4))


@dataclass(frozen=True)
class Samples:
    """Token samples [N, seq_length] (int64) from one dataset, with its provenance."""

    tokens: torch.Tensor
    dataset: TextDataset
    # the head of the dataset's text these tokens came from (about as many characters as they
    # span, and a margin), for the warning that an --eval_dataset repeats it; "" where unknown
    text: str = ""

    @property
    def provenance(self) -> dict:
        return {"dataset": self.dataset.name, "sha256": self.dataset.sha256,
                "samples": int(self.tokens.shape[0]), "seq_length": int(self.tokens.shape[1])}


def load_tokenizer_of(checkpoint_dir: Path):
    """The checkpoint's tokenizer (kiln.runtime.tokenizer: tokenizer.json and its config)."""
    from kiln.runtime.errors import TokenizerError
    from kiln.runtime.tokenizer import RECOPY, load_tokenizer

    path = checkpoint_dir / "tokenizer.json"
    again = "convert the checkpoint again from a Hugging Face dir that holds the tokenizer files"
    if not path.is_file():  # load_tokenizer's advice is an engine dir's (rebuild)
        raise DatasetError(f"{path}: missing, so kiln cannot tokenize the calibration and "
                           f"evaluation text; {again}")
    try:
        return load_tokenizer(checkpoint_dir)
    except TokenizerError as e:
        raise DatasetError(f"{checkpoint_dir}: cannot tokenize calibration text: "
                           f"{str(e).replace(RECOPY, again)}") from None


# tokens past ``limit`` a prefix's encoding must reach: its last word may tokenize otherwise
# once the next text follows it, and its first ``limit`` tokens must be the whole text's
_MARGIN = 16


def encode_stream(dataset: TextDataset, tokenizer, limit: int | None) -> list[int]:
    """Token ids of the texts joined by :data:`SEPARATOR`, encoded as one string as ``kiln eval``
    encodes them (at least their first ``limit`` tokens; all if None).

    Each text encoded alone, with the separator's own tokens between them, had given other
    tokens: a blank line is one token by itself and two between paragraphs in SmolLM2's
    tokenizer, and the gate's perplexity of a file was 21% off ``kiln eval``'s on it. Where a
    limit is given, whole texts are taken, twice as many each time, until their encoding holds
    ``limit`` tokens and a margin (at most about twice the encoding work of the text needed)."""
    return _encoded(dataset, tokenizer, limit)[0]


def _encoded(dataset: TextDataset, tokenizer, limit: int | None) -> tuple[list[int], str]:
    """:func:`encode_stream`'s ids, and the text they encode."""
    texts = dataset.texts
    if limit is None:
        text = SEPARATOR.join(texts)
        return tokenizer.encode(text, add_special_tokens=False), text
    take = 1
    while True:
        text = SEPARATOR.join(texts[:take])
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= limit + _MARGIN or take >= len(texts):
            return ids, text
        take *= 2


def token_samples(dataset: TextDataset, tokenizer, seq_length: int,
                  count: int | None = None) -> Samples:
    """``count`` samples of ``seq_length`` tokens (all whole ones if None; at least one)."""
    ids = encode_stream(dataset, tokenizer, None if count is None else count * seq_length)
    n = len(ids) // seq_length if count is None else count
    if n < 1 or len(ids) < n * seq_length:
        shorter = f" to {len(ids) // max(n, 1)} or less" if len(ids) >= 2 * max(n, 1) else ""
        raise TooFewTokens(
            f"{dataset.shown}: has {counted(len(ids), 'token')}, {max(n, 1) * seq_length} needed "
            f"({counted(max(n, 1), 'sample')} x {seq_length} tokens); pass more text or lower "
            f"the sample length ({option('calib_max_seq_length')}{shorter})", len(ids))
    tokens = torch.tensor(ids[:n * seq_length], dtype=torch.int64).view(n, seq_length)
    return Samples(tokens, dataset)


def split_calibration(dataset: TextDataset, tokenizer, calib_size: int, seq_length: int,
                      hold_out: bool = True) -> tuple[Samples, Samples]:
    """(calibration samples, held-out evaluation samples) from one dataset (module docstring);
    none held out where ``hold_out`` is False (an --eval_dataset scores the gate)."""
    evals = held_out(calib_size) if hold_out else 0
    need = (calib_size + evals) * seq_length
    ids, text = _encoded(dataset, tokenizer, need)
    if len(ids) < need:
        fit = len(ids) // seq_length * (4 if hold_out else 5) // 5
        lower = f"lower {option('calib_size')} (at most {fit} fit) or " \
            f"{option('calib_max_seq_length')}" if fit else \
            f"lower {option('calib_max_seq_length')} (not even one {seq_length}-token sample fits)"
        held = f" plus {counted(evals, 'held-out sample')} for the accuracy gate" if evals \
            else ""
        raise DatasetError(
            f"{dataset.shown}: has {counted(len(ids), 'token')}, "
            f"{option('calib_size', calib_size)} x {option('calib_max_seq_length', seq_length)}"
            f"{held} need {need}; pass more text, or {lower}")
    tokens = torch.tensor(ids[:need], dtype=torch.int64).view(calib_size + evals, seq_length)
    log.info("calibration: %d samples x %d tokens from %s, %d held out for the accuracy gate",
             calib_size, seq_length, dataset.name, evals)
    # the characters the calibration tokens span, in proportion, with a margin (5%, 200 more)
    read = text[:len(text) * calib_size * seq_length * 21 // (20 * len(ids)) + 200]
    return Samples(tokens[:calib_size], dataset, read), Samples(tokens[calib_size:], dataset)


def _normalised_lines(texts: Iterable[str]) -> Iterator[str]:
    """Each non-empty line of each text with its whitespace runs made one space, so a CRLF copy,
    a re-indented one or one with tabs compares equal to the original."""
    for text in texts:
        for line in text.splitlines():
            line = " ".join(line.split())
            if line:
                yield line


def shared_lines(evaluation: TextDataset, calibration: Sequence[str]) -> tuple[int, int]:
    """(lines of ``evaluation`` that ``calibration`` holds too, lines of ``evaluation``), counting
    its lines of :data:`MIN_SHARED_CHARS` characters or more (all of them if it has none).

    A byte-identical check had missed half of the calibration file and its CRLF copy. Lines,
    not word shingles: one hash per line costs about what ``load_texts``' own per-paragraph work
    costs, where shingles cost one per word of the whole calibration file; and the copies a user
    makes (a head or tail of the file, other line endings, its paragraphs as .jsonl, a directory
    holding it) keep their lines. A re-wrapped copy escapes. The calibration side is a set of
    ``hash()`` values (64-bit: a collision is too unlikely to matter), not of the lines."""
    seen = {hash(line) for line in _normalised_lines(calibration)}
    lines = list(_normalised_lines(evaluation.texts))
    counted_lines = [line for line in lines if len(line) >= MIN_SHARED_CHARS] or lines
    return sum(hash(line) in seen for line in counted_lines), len(counted_lines)
