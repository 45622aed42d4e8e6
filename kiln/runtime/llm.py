"""The Python API: ``LLM(engine_dir)``, ``generate``, ``generate_stream`` and ``chat``.

Contract:
- ``LLM(engine_dir)`` checks the engine dir against this machine, loads its executor and its
  tokenizer (``tokenizer.json`` via the ``tokenizers`` library) and reads
  ``generation_config.json``: its EOS ids always end generation (unless ``ignore_eos``), and its
  sampling fields are the default :class:`SamplingParams` when a call passes none.
- ``LLM(model=HF_DIR_OR_HUB_ID, **build_options)`` opens the engine the build cache holds for
  that checkpoint and those options, converting and building it first if it has none
  (:func:`kiln.build_cache.engine_for_model`: its keywords, e.g. ``backend``, ``dtype``,
  ``max_batch_size``, ``max_seq_len``, ``cache_dir``). Build options with an engine dir, or
  both an engine dir and a model, or neither, raise TypeError.
- An engine of the build cache is held from the LLM's opening to its ``close()`` (or its
  garbage collection): ``kiln cache prune`` and eviction leave it alone meanwhile.
- ``generate(prompts, params)`` returns one :class:`CompletionResult` per prompt, in order. A
  prompt is a string or a list of token ids. ``params`` is one SamplingParams for all prompts or
  one per prompt. All prompts are validated before any runs; a bad one raises
  :class:`~kiln.runtime.errors.RequestError` naming it.
- ``generate_stream`` yields :class:`StreamDelta` objects as tokens are produced (text deltas
  are whole UTF-8 characters and never include a stop string); the last delta of each prompt
  carries its result. Leaving the loop early aborts the prompts still running.
- A prompt that cannot go on (its logits turn non-finite, NaN or Inf, as from corrupt weights;
  or it needs more KV cache than the executor has) ends with finish_reason ``error``, the reason
  in its result's ``error`` (also logged as a warning); the other prompts of the call go on.
- ``chat(messages, params)`` renders the chat template and generates; ``render_chat`` gives the
  token ids for streaming a chat.
- An engine failure (an exception out of a step: a rank or replica of the engine died, a CUDA
  error) is terminal: the call raises it, :attr:`LLM.error` keeps it, and every later call
  raises it again at once (close the LLM and open the engine again).
- ``close()`` (or ``with LLM(...) as llm``) stops the engine's worker processes at once; an
  LLM dropped without it releases them when it is garbage collected (the executor's finalizer).
  A closed LLM raises :class:`~kiln.runtime.errors.EngineClosedError` when used.
- ``warm_up()`` runs a few short requests of every kind (:mod:`kiln.runtime.warm_up`) before
  the first real one, so that what compiles or sets up at first use does so then (``kiln
  serve`` calls it before it reports healthy); with replicas, each warms itself up.
- One thread drives an LLM at a time (a lock serializes calls); :class:`kiln.runtime.AsyncLLM`
  serves asyncio callers.
- ``ExecutorOptions(dp=N)``: N replicas of a single-rank engine, one process each (one GPU each
  on CUDA), behind one front that routes whole requests
  (:mod:`kiln.runtime.distributed.replicas`); ``core`` is then a
  :class:`~kiln.runtime.distributed.replicas.ReplicaCore`, ``executor`` is None, and ``limits``
  count the slots of every replica. ``ExecutorOptions(engine_process=True)`` is the same with one
  replica: the engine runs in a process of its own (what ``kiln serve`` does on a GPU).
- Under torchrun (``WORLD_SIZE`` > 1: :mod:`kiln.runtime.launch`), the ranks of a multi-rank
  engine are torchrun's processes, on this machine or several: on rank 0 the LLM is the driver,
  as usual; on any other rank ``LLM(...)`` serves the driver's engine as a worker and, once the
  driver closes it, raises ``SystemExit(0)``: that process ends with status 0, the rest of the
  script unrun there (:mod:`kiln.runtime.distributed.torchrun`). One such engine per launch.

Non-goals: multiple engines per LLM, LoRA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import numbers
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.engine import EngineManifest
from kiln.errors import ConfigError, counted, described, limits_as_options, shown
from kiln.interrupts import interrupt_in
from kiln.runtime.core import EngineCore, RequestDelta, check_encoded
from kiln.runtime.errors import (
    EngineClosedError,
    RequestError,
    StepInterrupted,
    TokenizerError,
)
from kiln.runtime.executor import Executor
from kiln.runtime.loader import ExecutorOptions, check_engine, open_engine, warn_once
from kiln.runtime.params import SamplingParams
from kiln.runtime.results import CompletionResult, StreamDelta
from kiln.runtime.scheduler import Policy
from kiln.runtime.tokenizer import (
    CHAT_ROLES,
    ModelTokenizer,
    generation_config_warnings,
    load_tokenizer,
    parts_error,
    text_of_parts,
)

if TYPE_CHECKING:
    from kiln.runtime.distributed.replicas import ReplicaCore

logger = logging.getLogger(__name__)

WAIT_NOTICE_S = 1.0  # a call that waits longer for another thread's is logged (INFO)
WAIT_POLL_S = 0.1  # a waiting call checks this often whether the LLM was closed meanwhile

Prompt = str | Sequence[int]
Messages = list[dict[str, Any]]


def _refuse_runtime_keywords(keywords: dict[str, Any], options: ExecutorOptions | None) -> None:
    """A TypeError for keywords of :class:`ExecutorOptions` (how the engine runs, not how it is
    built), which LLM takes as ``options=ExecutorOptions(...)``: a retest's
    ``LLM(dir, cpu_spin_wait=False)`` had been told these were build options."""
    runtime = sorted(set(keywords) & {f.name for f in dataclasses.fields(ExecutorOptions)})
    if runtime and options is not None:  # a retest had been told to do what it had done
        raise TypeError(f"LLM() got run-time options ({', '.join(runtime)}) as keywords beside "
                        f"options=; they go in its ExecutorOptions(...) only: set them there")
    if runtime:
        given = ", ".join(f"{name}={shown(keywords[name])}" for name in runtime)
        raise TypeError(f"LLM() takes run-time options ({', '.join(runtime)}) through "
                        f"options=: pass options=ExecutorOptions({given})")


def _unknown_beside_an_engine_dir(unknown: list[str], build: frozenset[str]) -> str:
    """Keywords ``LLM(engine_dir, ...)`` takes neither as build options (``build``, refused
    there as such) nor as run-time ones: each named, with the option it may have meant (a
    retest's had been called build options, then listed with the build options alone)."""
    runtime = [f.name for f in dataclasses.fields(ExecutorOptions)]
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, [*runtime, *sorted(build)], n=1)
        if close and close[0] in runtime:
            hints.append(f"{name}: did you mean options=ExecutorOptions({close[0]}=...)?")
        elif close:
            hints.append(f"{name}: did you mean {close[0]}, a build option of LLM(model=...)?")
    return (f"LLM() got unknown options {unknown}" + (f" ({'; '.join(hints)})" if hints else "")
            + "; beside an engine dir it takes its run-time options as "
              "options=ExecutorOptions(...), and build options with LLM(model=...) only")


class LLM:
    """Generate text with a built engine (see the module docstring)."""

    def __init__(self, engine_dir: str | Path | None = None, options: ExecutorOptions | None = None,
                 policy: Policy | None = None, *, model: str | Path | None = None,
                 **build_options: Any):
        if (engine_dir is None) == (model is None):
            raise TypeError("LLM() takes an engine dir (LLM('engines/x')) or model=... (a Hugging "
                            "Face checkpoint dir or hub id, built through the build cache)"
                            + (", not both" if model is not None else ""))
        for name, value in (("an engine dir", engine_dir), ("model", model)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"LLM() takes {name} as a str or Path, found "
                                f"{type(value).__name__} {value!r:.60}")
        if options is not None and not isinstance(options, ExecutorOptions):
            raise TypeError(f"LLM() takes options as ExecutorOptions(...), found "
                            f"{type(options).__name__} {options!r:.60}")
        _refuse_runtime_keywords(build_options, options)
        if engine_dir is not None and build_options:
            from kiln.build_cache.api import option_names
            from kiln.dirs import DirKind, classify_dir

            known = option_names() - {"check"}
            if unknown := sorted(k for k in build_options if k not in known):
                raise ConfigError(_unknown_beside_an_engine_dir(unknown, known))

            if classify_dir(engine_dir) is DirKind.HF_CHECKPOINT:
                raise TypeError(f"LLM() got {engine_dir} as an engine dir, and it is a Hugging "
                                f"Face checkpoint: pass LLM(model={str(engine_dir)!r}, ...) to "
                                f"build it with {sorted(build_options)}")
            raise TypeError(f"LLM() got build options {sorted(build_options)} with an engine dir, "
                            f"which is built already; they apply to LLM(model=...) only")
        if model is not None:  # its keywords go on to engine_for_model: refused as LLM's
            from kiln.build_cache.api import check_option_names

            check_option_names(build_options, "LLM", sets_itself=("check",))
        self.manifest: EngineManifest | None
        # how a closed LLM says to open it again: the form it was opened with
        self.opened_as = (f"LLM({str(engine_dir)!r})" if model is None else
                           f"LLM(model={str(model)!r}{', ...' if build_options else ''})")
        options = options or ExecutorOptions()
        hold = contextlib.ExitStack()  # the engine's cache entry, held until close()
        # model=: the engine's limits are this call's keywords, and advice names them as such
        advice = limits_as_options() if model is not None else contextlib.nullcontext()
        try:
            with advice:
                self.engine_dir = hold.enter_context(_held(engine_dir, model, options,
                                                           build_options))
                if options.dp > 1 or options.engine_process:
                    self._open_replicas(options, policy)
                else:
                    self._open(options, policy)
        except BaseException:
            hold.close()
            raise
        self._release = weakref.finalize(self, hold.close)  # dropped without close(): at GC

    def _open(self, options: ExecutorOptions, policy: Policy | None) -> None:
        self.manifest, executor = open_engine(self.engine_dir, options)
        try:
            tokenizer = load_tokenizer(self.engine_dir)
        except TokenizerError:
            executor.close()
            raise
        self._setup(executor, tokenizer, policy)

    def _open_replicas(self, options: ExecutorOptions, policy: Policy | None) -> None:
        """``options.dp`` replicas (one with ``engine_process``) behind one front
        (kiln.runtime.distributed.replicas)."""
        from kiln.runtime.distributed.replicas import ReplicaCore

        checked = check_engine(self.engine_dir, options)  # a bad engine dir named as such first
        tokenizer = load_tokenizer(self.engine_dir)  # before any process starts
        core = ReplicaCore.open(self.engine_dir, options, policy, checked=checked)
        self.manifest = core.manifest
        self._setup(None, tokenizer, policy, core)

    @classmethod
    def from_executor(cls, executor: Executor, tokenizer: ModelTokenizer | None = None,
                      policy: Policy | None = None) -> LLM:
        """An LLM over an executor built by hand (the oracle's, a mock model's in tests)."""
        llm = cls.__new__(cls)
        llm.engine_dir, llm.manifest, llm._release = None, None, None
        llm.opened_as = "LLM.from_executor(...)"
        llm._setup(executor, tokenizer, policy)
        return llm

    def _setup(self, executor: Executor | None, tokenizer: ModelTokenizer | None,
               policy: Policy | None, core: ReplicaCore | None = None) -> None:
        self.executor = executor  # None with replicas: each runs its own
        self.tokenizer = tokenizer
        self.core = core if core is not None else EngineCore(executor, tokenizer, policy,
                                                            engine_dir=self.engine_dir)
        self.lock = threading.Lock()  # one call at a time (a stream holds it until its end)
        self._driver: threading.Thread | None = None  # the thread whose call holds the lock
        # held while the engine runs (a step, a warm-up, a release) and while close() frees it
        self._engine_lock = threading.Lock()
        self.async_owner: object | None = None  # an open AsyncLLM drives the core instead
        self.error: BaseException | None = None  # the engine's failure: terminal
        self.closed = False
        gc = tokenizer.generation_config if tokenizer is not None else {}
        self.default_params = SamplingParams.from_generation_config(gc)
        where, copy = _generation_config_file(self.engine_dir)
        for said in generation_config_warnings(gc, self.core.vocab_size, where, copy):
            warn_once(said, logger)
        if tokenizer is not None and (said := tokenizer.past_vocabulary(self.core.vocab_size)):
            logger.warning("%s: %s (rebuild from a checkpoint converted from the model's own "
                           "Hugging Face dir)", self.engine_dir, said)

    @property
    def limits(self):
        """The engine's limits (with replicas: max_batch_size and max_num_tokens of all)."""
        return self.core.limits

    @property
    def gathers_context_logits(self) -> bool:
        return self.core.gathers_context_logits if self.executor is None \
            else self.executor.gathers_context_logits

    def close(self, now: bool = False) -> None:
        """Stop the engine (its worker processes too); later calls raise EngineClosedError.
        Engine processes (replicas, ``engine_process``) are asked to exit and killed if they
        have not within seconds, or killed at once with ``now`` (as a ``with`` block left by
        Ctrl-C does).

        Safe from any thread: a step under way ends first (its memory is not freed under
        it), and the call that ran it, or a stream left open, raises EngineClosedError at its
        next step. Refused while an AsyncLLM drives this LLM: close that one, which hands it
        back."""
        if self.closed:
            return
        if self.async_owner is not None:
            raise RuntimeError("this LLM is driven by an AsyncLLM; close the AsyncLLM first "
                               "(AsyncLLM.close(), or the end of its `async with`), then this")
        self.closed = True  # before the wait: a call under way stops at its next step
        if self.executor is None:
            self.core.wake()  # a step waiting on the replicas returns now
        self.interrupt_step()  # a long one (a CPU prefill: seconds) ends now
        try:
            with self._engine_lock:
                if self.executor is not None:
                    self.executor.close()
                else:
                    self.core.close(now)
        finally:
            if self._release is not None:
                self._release()  # the cache entry may be pruned from now on

    def interrupt_step(self) -> None:
        """End the engine's step under way early, from any thread (an AsyncLLM's close, or
        kiln serve aborting every request): its requests run it again at the next step, unless
        they were aborted meanwhile. Where no step runs, the next one ends at once and is run
        again. Executors whose steps end within milliseconds ignore it
        (:meth:`kiln.runtime.executor.Executor.interrupt`), as do engine processes. Each call
        throws the step's work away: called more often than a step takes, no request makes
        progress (kiln calls it only where the engine closes or every request was aborted)."""
        if self.executor is not None:
            self.executor.interrupt()

    def __enter__(self) -> LLM:
        self.check_open()
        return self

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        # Left by Ctrl-C (SIGTERM, SIGHUP): engine processes are killed at once, not asked
        # to exit after a step that takes seconds on a CPU (a retest's --dp 2: 5 s to stop).
        self.close(now=interrupt_in(error) is not None)

    def check_open(self) -> None:
        """Raise unless this LLM can run requests: it was closed (EngineClosedError), or its
        engine failed (that error again)."""
        if self.closed:
            raise EngineClosedError(f"this LLM was closed; open the engine again "
                                    f"({self.opened_as})")
        if self.error is not None:
            raise self.error.with_traceback(None)

    def check_alive(self) -> None:
        """Raise (and keep, as :meth:`_step`) the failure of an engine process that died while
        no step ran; nothing for an engine in this process."""
        try:
            self.core.check_alive()
        except Exception as e:
            self.error = e
            raise

    def _step(self) -> list[RequestDelta]:
        """One core step (generate_stream's, or an AsyncLLM's engine thread's); an exception
        out of it is the engine's failure, kept in :attr:`error`. EngineClosedError where
        :meth:`close` came first (from another thread, or under an open stream)."""
        with self._engine_lock:
            if self.closed:
                raise EngineClosedError("this LLM was closed while a call of it ran (from "
                                        "another thread, or under an open stream); its "
                                        "requests ended unfinished")
            try:
                return self.core.step()
            except StepInterrupted:  # (interrupt_step): nothing of it was committed
                if self.closed:
                    raise EngineClosedError("this LLM was closed while a call of it ran (from "
                                            "another thread); its requests ended "
                                            "unfinished") from None
                return []  # its requests run it again, unless aborted meanwhile
            except Exception as e:
                self.error = e
                raise

    def warm_up(self) -> float:
        """Run the warm-up requests (kiln.runtime.warm_up) before any other, where the engine
        needs them (not on the CPU); its seconds, logged at INFO."""
        from kiln.runtime.warm_up import warm_up

        self.check_open()
        if self.async_owner is not None:
            raise RuntimeError("warm the LLM up before an AsyncLLM drives it")
        start = time.perf_counter()
        with self._driving():
            if self.core.has_work():
                raise RuntimeError("warm the LLM up before it takes requests")
            with self._engine_lock:
                self.check_open()  # closed by another thread meanwhile
                try:
                    if self.executor is None:  # replicas: each warms its engine up, together
                        warmed = self.core.warm_up()
                    else:
                        warmed = warm_up(self.core)
                except Exception as e:  # out of a step: the engine's failure, as in _step
                    self.error = e
                    raise
        seconds = time.perf_counter() - start
        if warmed:
            logger.info("warmed the engine up in %.2f s", seconds)
        else:
            logger.info("no warm-up: the engine runs on the CPU, where nothing is compiled or "
                        "set up at first use")
        return seconds

    @contextlib.contextmanager
    def _driving(self) -> Iterator[None]:
        """The lock that serializes calls. Another thread's call waits for it, and ends with
        EngineClosedError if the LLM is closed meanwhile; it is refused while a stream of its
        own thread, or of a thread that has ended, is still open (left unfinished and not
        closed, such a stream holds the lock: waiting would never end)."""
        this = threading.current_thread()
        if self._driver is this:
            raise RuntimeError("a generate_stream of this LLM is still open in this thread (not "
                               "read to its end, nor closed): finish it or call its close() "
                               "first, which aborts its requests")
        waited = 0.0
        while not self.lock.acquire(timeout=WAIT_POLL_S):
            self.check_open()  # closed (or failed) meanwhile: waiting would be for nothing
            driver = self._driver
            if driver is not None and not driver.is_alive():
                raise RuntimeError(f"a generate_stream of this LLM is still open in thread "
                                   f"{driver.name!r}, which has ended (not read to its end, nor "
                                   f"closed): call its close(), which aborts its requests, or "
                                   f"drop it")
            waited += WAIT_POLL_S
            if driver is not None and waited - WAIT_POLL_S < WAIT_NOTICE_S <= waited:
                logger.info("waiting for this LLM's call in thread %r to end: an LLM runs one "
                            "call at a time (AsyncLLM runs requests of many callers together)",
                            driver.name)
        try:
            self._driver = this
            yield
        finally:
            self._driver = None
            self.lock.release()

    # -- prompts -----------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("text prompts need a tokenizer; pass token ids instead")
            return check_encoded(self.tokenizer.encode(prompt, most=self.limits.max_input_len),
                                 self.core.vocab_size)
        ids = list(prompt) if isinstance(prompt, (list, tuple)) else None
        # numpy's integers too (retest 44c: np.int64 ids, which evaluate takes, were refused)
        if ids is None or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                  for t in ids):
            raise RequestError(f"a prompt must be a string or a list of int token ids, found "
                               f"{described(prompt)}")
        return [int(t) for t in ids]

    def render_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        conversations = _conversations(messages)
        if len(conversations) != 1:
            raise RequestError(f"render_chat takes one conversation, found "
                               f"{len(conversations)}; chat() takes several")
        return self._chat_ids(conversations[0], add_generation_prompt)

    def _chat_ids(self, conversation: Messages, add_generation_prompt: bool = True) -> list[int]:
        """:meth:`render_chat` of a conversation :func:`_conversations` has checked."""
        if self.tokenizer is None:
            raise TokenizerError("chat needs a tokenizer with a chat template")
        return check_encoded(self.tokenizer.chat_ids(conversation, add_generation_prompt,
                                                     most=self.limits.max_input_len),
                             self.core.vocab_size)

    def _params_list(self, n: int, params: SamplingParams | Sequence[SamplingParams] | None,
                     ) -> list[SamplingParams]:
        if params is None:
            return [self.default_params] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if not isinstance(params, (list, tuple)) \
                or not all(isinstance(p, SamplingParams) for p in params):
            raise RequestError(f"sampling params must be a SamplingParams or a list of them (one "
                               f"per prompt), found {described(params)}; "
                               f"SamplingParams(**options) makes one")
        params = list(params)
        if len(params) != n:
            raise RequestError(f"got {len(params)} SamplingParams for {counted(n, 'prompt')}; "
                               f"pass one, or one per prompt")
        return params

    def _add_all(self, prompts: Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None) -> list[str]:
        """Validate every prompt first, then queue them all (so a bad one queues nothing)."""
        plist = self._params_list(len(prompts), params)
        encoded = []
        for i, prompt in enumerate(prompts):
            label = f"prompts[{i}]"  # an id outside the vocabulary: prompts[0][2]
            try:
                ids = self.encode(prompt)
            except RequestError as e:  # which prompt, as check_prompt's messages say
                raise RequestError(f"{label}: {e}") from None
            self.core.check_prompt(label, ids, path=label)
            encoded.append(ids)
        return [self.core.add_request(ids, p, prompt=prompt if isinstance(prompt, str) else None
                                      ).request_id
                for ids, p, prompt in zip(encoded, plist, prompts, strict=True)]

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[CompletionResult]:
        """One result per prompt, in order (see the module docstring)."""
        prompts = _as_list(prompts)
        results: dict[int, CompletionResult] = {}
        for delta in self.generate_stream(prompts, params):
            if delta.result is not None:
                results[delta.index] = delta.result
        return [results[i] for i in range(len(prompts))]

    def generate_stream(self, prompts: Prompt | Sequence[Prompt],
                        params: SamplingParams | Sequence[SamplingParams] | None = None,
                        ) -> Iterator[StreamDelta]:
        """Deltas of all prompts as they are produced (see the module docstring)."""
        prompts = _as_list(prompts)
        self.check_open()
        if self.async_owner is not None:
            raise RuntimeError("this LLM is driven by an AsyncLLM; use its submit/stream, or "
                               "close it first")
        with self._driving():
            ids = self._add_all(prompts, params)
            index = {rid: i for i, rid in enumerate(ids)}
            live = set(ids)
            try:
                while live:
                    for delta in self._step():
                        if delta.request_id not in index:
                            continue  # another caller's request (cannot happen under the lock)
                        request = self.core.requests[delta.request_id]
                        if delta.finished:
                            live.discard(delta.request_id)
                            self.core.pop(delta.request_id)
                        if delta.text or delta.token_ids or delta.finished:
                            yield StreamDelta.of(index[delta.request_id], delta, request)
            finally:
                with self._engine_lock:
                    # the caller stopped early, or an error escaped; in submission order,
                    # the scheduler's queue order
                    for rid in [r for r in ids if r in live]:
                        if not self.closed:  # closed: the executor and its slots are gone
                            self.core.abort(rid)
                        self.core.pop(rid)

    def chat(self, messages: Messages | Sequence[Messages],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             ) -> list[CompletionResult]:
        """Generate replies to one conversation (a list of messages) or to several."""
        conversations = _conversations(messages)
        ids = []
        for i, conversation in enumerate(conversations):
            try:
                ids.append(self._chat_ids(conversation))
            except RequestError as e:  # which conversation, as generate names its prompts
                label = "messages" if len(conversations) == 1 else f"conversation #{i}"
                raise RequestError(f"{label}: {e}") from None
        return self.generate(ids, params)


def _generation_config_file(engine_dir: Path | None) -> tuple[str, bool]:
    """The ``generation_config.json`` a user edits to change what the engine holds a copy of,
    and whether the one named is that copy: for an engine of the build cache
    (``LLM(model=...)``, ``--model_dir``) the Hugging Face checkpoint's (a warning had named
    the copy deep in the cache); for an engine dir of its own, its copy (the checkpoint it
    came from is not recorded), which an edit would make ``kiln verify`` fail."""
    if engine_dir is None:  # LLM.from_executor
        return "the tokenizer's generation_config.json", False
    from kiln.build_cache.store import built_from

    source = built_from(engine_dir)
    if source is None:
        return str(Path(engine_dir) / "generation_config.json"), True
    if Path(source).is_dir():
        return str(Path(source) / "generation_config.json"), False
    return f"{source}'s generation_config.json", False  # a hub model: org/name@commit


def _held(engine_dir: str | Path | None, model: str | Path | None, options: ExecutorOptions,
          build_options: dict[str, Any]) -> contextlib.AbstractContextManager[Path]:
    """The engine dir to open, held while it is used (kiln.build_cache: prune and eviction skip
    it; kiln.dir_locks: ``--overwrite`` refuses it): ``engine_dir``, or ``model``'s cached engine,
    converted and built first if the cache has none. The build cache sits above the runtime
    in the pipeline: it imports the builder only to build, so only for ``model=``. Before a
    build, the engine it would make is checked against this machine and ``options``."""
    if model is not None:
        from kiln.build_cache.api import cached_engine
        from kiln.runtime.loader import check_runnable

        return cached_engine(model, check=lambda manifest, _: check_runnable(manifest, options),
                             **build_options)
    from kiln.build_cache.api import hold_engine

    return hold_engine(engine_dir)


def _conversations(messages: Messages | Sequence[Messages]) -> list[Messages]:
    """``LLM.chat``'s argument as a list of conversations, each a non-empty list of messages
    with a string ``role`` and a ``content``: a string, or OpenAI's list of text parts (given
    to the template as their joined text, as ``kiln serve`` does).
    The caller's messages are not changed."""
    one = isinstance(messages, (list, tuple)) and bool(messages) \
        and isinstance(messages[0], dict)
    conversations = [messages] if one else messages
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise RequestError(f"chat takes a conversation (a list of {{'role': ..., 'content': "
                           f"...}} messages) or a list of them, found {described(messages)}")
    checked = []
    for c, conversation in enumerate(conversations):
        where = "" if one else f"conversation #{c}: "
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise RequestError(f"{where}a conversation is a non-empty list of messages, found "
                               f"{described(conversation)}")
        messages_out = []
        for i, m in enumerate(conversation):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(content, (str, list)):
                # (an assistant's None content, for tool calls kiln does not take, had failed
                # in the template's jinja)
                raise RequestError(f"{where}message #{i} needs a 'role' string and a 'content' "
                                   f"string or list of text parts, found {described(m)}")
            if m["role"] not in CHAT_ROLES:  # trial D's: any role went to the template
                raise RequestError(f"{where}message #{i}: role {m['role']!r} is not a chat role; "
                                   f"use one of {', '.join(CHAT_ROLES)}")
            name = m.get("name")
            if not (name is None or isinstance(name, str)):  # kiln serve refuses it too
                raise RequestError(f"{where}message #{i}: name is {described(name)}; give the "
                                   f"participant's name as a string, or leave it out")
            if isinstance(content, list):
                why = parts_error(content, "chat")
                if why is not None:  # named as kiln serve names it
                    raise RequestError(f"{where}message #{i}: {why}")
                m = {**m, "content": text_of_parts(content)}
            messages_out.append(m)
        checked.append(messages_out)
    return checked


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise RequestError(f"prompts must be a string, a list of token ids, or a list of those, "
                           f"found {described(prompts)}")
    prompts = list(prompts)
    if prompts and all(isinstance(t, numbers.Integral) for t in prompts):
        return [prompts]  # one prompt of token ids (numpy's too)
    return prompts
