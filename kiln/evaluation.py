"""Sliding-window perplexity of an engine on a text dataset: ``kiln eval`` and its Python API.

The windows are Hugging Face's (https://huggingface.co/docs/transformers/perplexity): the
dataset's texts joined with ``"\\n\\n"`` are tokenized once (with the tokenizer's special
tokens, as ``tokenizer(text)`` does: a BOS where the model adds one); windows of
``max_length`` tokens start every ``stride`` tokens (``begin = 0, stride, 2 * stride, ...``,
``end = min(begin + max_length, N)``, the last window is the one that reaches ``N``). Each
window scores only its last ``end - previous_end`` tokens (those the previous window did not),
each token given every token before it in the window; its first token is never a target. So
every token but the first is scored exactly once (with ``stride == max_length``, every window's
first token is context only), and perplexity = exp(the mean negative log-likelihood of the
scored tokens), the definition on that page. A text that would score fewer than
:data:`MIN_SCORED` tokens is refused (one token's figure is its probability alone); one of
fewer than :data:`FEW_TOKENS` is scored, with a warning.

One deliberate difference from the page's code snippet: it weights each window's mean loss by
``num_valid_tokens - batch_size``, one less than the tokens the window scored after the first
window. That undercounts every later window by a token, and at ``stride`` 1 (one target per
window) gives each of them weight 0, so the "perplexity" is the first window's alone. kiln
weights each scored token once. Both agree exactly when the windows do not overlap
(``stride == max_length``).

Defaults: ``max_length`` = the engine's ``max_input_len`` (a window is one prompt);
``stride`` = ``max_length // 2``. ``stride == max_length`` gives disjoint windows (faster,
higher perplexity: less context per token).

The engine scores each window as one request with ``SamplingParams(max_tokens=0,
prompt_logprobs=0)``, so it needs an engine built with ``--gather_context_logits``; the
windows run through the in-flight batcher together (chunked when longer than
``max_num_tokens``). Bad input raises :class:`~kiln.errors.KilnError` subclasses with one-line
messages. Imports stay light (no torch) until an engine is opened.

Non-goals: other metrics, batching several datasets, BOS per window (HF's method has none).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.datasets import TextDataset, load_texts
from kiln.errors import (
    ConfigError,
    DatasetError,
    EngineError,
    build_larger,
    build_with,
    check_flag,
    check_integer,
    check_path,
    counted,
    cut,
    described,
    named_as_flags,
    option,
    outside_vocabulary,
)

if TYPE_CHECKING:
    from kiln.runtime import LLM
    from kiln.runtime.loader import ExecutorOptions

logger = logging.getLogger(__name__)

# fewer scored tokens than this: the figure is said to be too few to compare (kiln quantize's
# accuracy gate refuses to decide on fewer, MIN_GATE_TOKENS)
FEW_TOKENS = 64
# fewer scored tokens than this: refused, for a perplexity on one token is that token's
# probability alone, not a mean over a text (a trial's "Hi." gave "perplexity 80.209628", exit 0)
MIN_SCORED = 2


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)``; its last ``targets`` tokens are scored (all but the first token
    in the first window)."""

    begin: int
    end: int
    targets: int


@dataclass(frozen=True)
class PerplexityResult:
    """What ``kiln eval --json_output`` writes (``to_dict``)."""

    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats), log(perplexity)
    tokens: int  # tokens scored (every token but the first; with stride == max_length every
    # window's first token is context only)
    seconds: float  # wall time of the scoring
    windows: int
    max_length: int
    stride: int
    dataset: str = ""
    dataset_sha256: str = ""
    engine_dir: str = ""

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None  # JSON has no inf

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """HF's windows over ``num_tokens`` tokens (module docstring)."""
    if num_tokens - 1 < MIN_SCORED:
        raise DatasetError(too_short(num_tokens))
    check_window(max_length, stride)
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append(Window(begin, end, end - previous_end))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def too_short(num_tokens: int, added: int = 0) -> str:
    """Why a text of ``num_tokens`` tokens (``added`` of them the tokenizer's special tokens,
    a BOS) cannot be scored: every token but the first is, and MIN_SCORED must be."""
    special = f" with the {counted(added, 'special token')} the tokenizer adds" if added else ""
    scored = counted(max(num_tokens - 1, 0), "token")
    return (f"the text is {counted(num_tokens, 'token')} long{special}, so {scored} to score "
            f"(the first is context only); perplexity needs at least {MIN_SCORED} to score: "
            f"give a text of at least {MIN_SCORED + 1} tokens")


def text_tokens(tokenizer: Any, data: TextDataset) -> list[int]:
    """The token ids ``data`` is scored on (``tokenizer``'s special tokens included, module
    docstring), or DatasetError naming it by the path given when too few score."""
    token_ids = tokenizer.encode(data.joined())
    if len(token_ids) - 1 < MIN_SCORED:
        added = len(token_ids) - len(tokenizer.encode(data.joined(), add_special_tokens=False))
        raise DatasetError(f"{data.shown}: {too_short(len(token_ids), added)}")
    return token_ids


def check_token_ids(token_ids: Any, vocab_size: int) -> list[int]:
    """``token_ids`` (a caller's, for :func:`evaluate`) as a list of Python ints, or ConfigError
    unless it is a list or tuple of integers (of any type but bool: numpy's too) or a 1-D integer
    numpy array or torch tensor, every id in the engine's vocabulary ``[0, vocab_size)``;
    DatasetError unless they are enough to score (MIN_SCORED): checked before the engine loads.
    An id outside had failed in the engine, named ``prompt #0``; a str had been scored as the
    text of its characters; np.int64(1) had been told it "must be an integer"."""
    flat = "token_ids must be one flat (1-D) list of ids (one text's: flatten them)"
    if getattr(token_ids, "ndim", 1) > 1:  # (its rows had been named "token_ids[0]")
        kind = "tensor" if type(token_ids).__module__.startswith("torch") else "array"
        try:  # (a nested tensor has no shape to tell)
            shape = f" of shape {tuple(token_ids.shape)}"
        except RuntimeError:
            shape = ""
        raise ConfigError(f"{flat}, found a {token_ids.ndim}-D {kind}{shape}")
    ids = _plain(token_ids, "token_ids")
    if not isinstance(ids, (list, tuple)):
        raise ConfigError(f"token_ids must be a list of int token ids, found "
                          f"{described(token_ids)}")
    ids = [_plain(token, f"token_ids[{i}]") for i, token in enumerate(ids)]  # np.int64s: ints
    for i, token in enumerate(ids):
        if isinstance(token, (list, tuple)):
            raise ConfigError(f"{flat}, found a {type(token).__name__} at [{i}]")
        check_integer(f"token_ids[{i}]", token, ConfigError)
    outside = outside_vocabulary(ids, vocab_size, "token_ids")
    if outside is not None:
        raise ConfigError(str(outside))
    if len(ids) - 1 < MIN_SCORED:  # (too_short's words are a text's)
        raise DatasetError(f"token_ids holds {counted(len(ids), 'id')}; every id but the first "
                           f"is scored and perplexity needs at least {MIN_SCORED}: give at least "
                           f"{MIN_SCORED + 1}")
    return ids


def _plain(value: Any, name: str) -> Any:
    """``value`` in Python's types where it is numpy's or torch's (its ``tolist()``: a 1-D
    integer array is a list of ints, np.int64(1) is 1, np.True_ is True, a 2-D array nested
    lists), else as given: checked as the Python value it stands for. ConfigError naming it
    (``name``) where its values cannot be read: a meta tensor's (it holds none), a sparse or
    quantized one's, where torch's own error had escaped (a CUDA tensor's are copied)."""
    tolist = getattr(value, "tolist", None)
    if not callable(tolist) or isinstance(value, (list, tuple)):
        return value
    try:
        return tolist()
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {_unreadable(value, e)}") from None


def _unreadable(tensor: Any, error: Exception) -> str:
    """Why a tensor's (or array's) token ids cannot be read, and what to pass instead."""
    if getattr(tensor, "is_meta", False):
        return ("a meta tensor holds no values; pass a tensor that holds the ids (on the CPU or "
                "a GPU) or a list of ints")
    layout = str(getattr(tensor, "layout", "torch.strided"))
    if layout != "torch.strided":  # sparse_coo, sparse_csr, jagged...
        return (f"the values of a {layout.removeprefix('torch.')} tensor cannot be read as a "
                f"list; pass a dense one (.to_dense()) or a list of ints")
    kind = f"a {tensor.dtype} tensor" if hasattr(tensor, "dtype") else type(tensor).__name__
    said = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"cannot read the values of {kind} ({cut(said, 80)}); pass a list of ints"


def check_integers(max_length: Any, stride: Any) -> None:
    """ConfigError unless ``max_length`` and ``stride`` are ints where given (not None)."""
    for name, value in (("max_length", max_length), ("stride", stride)):
        if value is not None:
            check_integer(name, value, ConfigError)


def check_window(max_length: int, stride: int) -> None:
    """ConfigError unless ``stride`` is in [1, ``max_length``] and ``max_length`` >= 2 (the one
    wording of these refusals, also where kiln eval checks its flags before a build)."""
    check_integers(max_length, stride)
    if max_length < 2:  # first: no stride fits a max_length below 2
        raise ConfigError(f"max_length {max_length} must be at least 2; raise "
                          f"{option('max_length')}")
    if not 1 <= stride <= max_length:  # (a stride of 0 had been told to be lowered)
        raise ConfigError(f"stride {stride} must be in [1, max_length {max_length}]; "
                          f"{'raise' if stride < 1 else 'lower'} {option('stride')}")


def resolve_window(max_input_len: int, max_length: int | None,
                   stride: int | None) -> tuple[int, int]:
    """(max_length, stride) on an engine of ``max_input_len`` (the defaults filled in, module
    docstring), or ConfigError: checked before a ``--model_dir`` engine is built, too."""
    check_integers(max_length, stride)
    max_length = max_input_len if max_length is None else max_length
    if max_length > max_input_len:
        raise ConfigError(f"max_length {max_length} exceeds the engine's max_input_len "
                          f"{max_input_len}; lower {option('max_length')} or "
                          f"{build_larger('max_input_len')}")
    stride = max(1, max_length // 2) if stride is None else stride
    check_window(max_length, stride)
    return max_length, stride


def window_nll(logprobs: list[float], window: Window, index: int) -> tuple[float, int]:
    """(mean negative log-likelihood of the window's targets, targets scored), from the
    logprob of each window token after the first given the ones before it."""
    targets = logprobs[-window.targets:] if window.targets < window.end - window.begin \
        else logprobs  # the first window: every token after the first
    nll = -math.fsum(targets) / len(targets)
    if not math.isfinite(nll):
        raise DatasetError(f"window {index}: the loss is not finite ({nll}); the engine's "
                           f"numerics are broken (build in float32)")
    return nll, len(targets)


def score_windows(llm: LLM, token_ids: list[int], windows: list[Window],
                  progress: bool = False) -> tuple[float, int]:
    """(sum of the negative log-likelihoods of the scored tokens, tokens scored) for ``windows``
    of ``token_ids``."""
    from kiln.progress import progress_bar
    from kiln.runtime import SamplingParams

    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    prompts = [token_ids[w.begin:w.end] for w in windows]
    nll_sum, scored = 0.0, 0
    bar = progress_bar(total=len(windows), desc="eval", unit="window", show=progress,
                       dynamic_ncols=True)
    started = time.perf_counter()
    with bar:
        for delta in llm.generate_stream(prompts, params):
            if delta.result is None:
                continue
            result, window = delta.result, windows[delta.index]
            if result.error is not None:
                raise DatasetError(f"window {delta.index} (tokens {window.begin}..{window.end}) "
                                   f"failed: {result.error}")
            logprobs = [e.logprob for e in result.prompt_logprobs[1:]]  # token 0: none
            nll, count = window_nll(logprobs, window, delta.index)
            nll_sum += nll * count
            scored += count
            bar.update(1)
            bar.set_postfix_str(f"{scored / max(time.perf_counter() - started, 1e-9):.0f} tok/s")
    return nll_sum, scored


def perplexity(llm: LLM, token_ids: list[int], max_length: int | None = None,
               stride: int | None = None, progress: bool = False) -> PerplexityResult:
    """Sliding-window perplexity of ``token_ids`` on ``llm``'s engine (module docstring)."""
    max_length, stride = resolve_window(llm.limits.max_input_len, max_length, stride)
    windows = sliding_windows(len(token_ids), max_length, stride)
    logger.info("perplexity: %d tokens, %d windows of up to %d tokens, stride %d",
                len(token_ids), len(windows), max_length, stride)
    started = time.perf_counter()
    nll_sum, scored = score_windows(llm, token_ids, windows, progress)
    seconds = time.perf_counter() - started
    nll = nll_sum / scored
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=scored,
                            seconds=seconds, windows=len(windows), max_length=max_length,
                            stride=stride)


def evaluate(engine_dir: str | Path, dataset: str | Path | TextDataset,
             max_length: int | None = None, stride: int | None = None,
             options: ExecutorOptions | None = None, progress: bool = False, *,
             token_ids: list[int] | None = None) -> PerplexityResult:
    """Perplexity of the engine in ``engine_dir`` on ``dataset`` (a path or hub id for
    :func:`kiln.datasets.load_texts`, or a loaded :class:`TextDataset`). ``token_ids``: what
    :func:`text_tokens` gave for ``dataset`` with the engine's tokenizer files, when the caller
    has them (``kiln eval --model_dir`` tokenized it before the build: a large dataset's
    seconds had been spent twice): a list, or a 1-D integer numpy array or torch tensor, checked
    before the engine loads (:func:`check_token_ids`); None: tokenized here."""
    from kiln.engine import read_manifest
    from kiln.runtime import LLM
    from kiln.runtime.tokenizer import load_tokenizer

    check_flag("progress", progress, ConfigError)
    check_path("engine_dir", engine_dir, EngineError, "pass the engine dir kiln build wrote")
    if not isinstance(dataset, TextDataset):
        check_path("dataset", dataset, DatasetError, "pass a .txt, .jsonl or .parquet file, a "
                   "directory or a hub dataset id (owner/name)")
    check_integers(max_length, stride)
    data = dataset if isinstance(dataset, TextDataset) else load_texts(dataset)
    if stride is not None and max_length is not None:
        check_window(max_length, stride)
    manifest = read_manifest(engine_dir)
    if not manifest.gather_context_logits:
        raise ConfigError(f"{engine_dir}: perplexity needs every position's logits, and this "
                          f"engine returns the last one only; rebuild it with "
                          f"{build_with('gather_context_logits')}")
    # the window and the text are checked before the engine loads (seconds to minutes)
    max_length, stride = resolve_window(manifest.limits.max_input_len, max_length, stride)
    # what was scored, for the warning below: a Python caller's token_ids, not the dataset's
    # text (a retest's token_ids=[1, 2, 3] had been told "ds.txt: ... rests on 2 tokens");
    # kiln eval's are the dataset's own (text_tokens), and its user never named token_ids
    scored = "token_ids" if token_ids is not None and not named_as_flags() else data.shown
    if token_ids is None:
        token_ids = text_tokens(load_tokenizer(engine_dir), data)
    else:
        token_ids = check_token_ids(token_ids, manifest.decoder.vocab_size)
    with LLM(engine_dir, options) as llm:
        result = perplexity(llm, token_ids, max_length, stride, progress)
    if result.tokens < FEW_TOKENS:  # a trial's 3-token text gave a figure without a word
        logger.warning("%s: the perplexity rests on %s, too few to compare with another "
                       "figure; give a longer text", scored, counted(result.tokens, "token"))
    return PerplexityResult(**{**asdict(result), "dataset": data.name,
                               "dataset_sha256": data.sha256, "engine_dir": str(engine_dir)})
