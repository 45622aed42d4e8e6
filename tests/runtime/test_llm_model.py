"""LLM(model=...) and AsyncLLM(model=...): a Hugging Face checkpoint built through the build
cache (build options passed through), held while open and released on close or when dropped;
the engine-dir API unchanged; wrong combinations are TypeErrors."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re

import pytest

from kiln.build_cache.store import Busy, EngineCache
from kiln.errors import ConfigError
from kiln.runtime import LLM, AsyncLLM, ExecutorOptions, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@contextlib.contextmanager
def mock_said():
    """Each warning said again, not once a process (:func:`kiln.runtime.loader.warn_once`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("kiln.runtime.loader._WARNED", set())
        yield


def _busy(cache: EngineCache, name: str) -> bool:
    """Whether entry ``name``'s lock is held (a prune would keep it: in use)."""
    try:
        with cache.locked(name, write=True, wait=False):
            return False
    except Busy:
        return True


def test_model_builds_through_the_cache_with_the_options_given(tiny_hf, cache, caplog):
    with LLM(model=tiny_hf, max_batch_size=2, max_seq_len=48) as llm:
        (entry,) = cache.entries()
        assert llm.engine_dir == entry.engine_dir
        assert (llm.limits.max_batch_size, llm.limits.max_seq_len) == (2, 48)
        text = llm.generate("Hello", GREEDY)[0].text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kiln.build_cache"):
        with LLM(model=str(tiny_hf), max_batch_size=2, max_seq_len=48) as again:
            assert again.engine_dir == entry.engine_dir
            assert again.generate("Hello", GREEDY)[0].text == text
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"using cached engine {entry.engine_dir}"]
    with LLM(entry.engine_dir) as by_dir:  # the engine-dir API, on the same engine
        assert by_dir.generate("Hello", GREEDY)[0].text == text



def test_a_generation_config_warning_names_the_hugging_face_file(tiny_hf, cache, tmp_path,
                                                                  caplog):
    """A field kiln does not apply is named in the checkpoint's file the user edits, not in
    the engine's copy deep in the build cache (as it had been), also when that engine is
    opened by its path; an engine dir of its own names its own file."""
    import json
    import shutil

    hf = shutil.copytree(tiny_hf, tmp_path / "hf")
    config = hf / "generation_config.json"
    fields = json.loads(config.read_text()) if config.exists() else {}
    config.write_text(json.dumps({**fields, "no_repeat_ngram_size": 5}))

    def warned(**ask) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kiln.runtime.llm"), mock_said(), \
                LLM(**ask):
            return [r.getMessage() for r in caplog.records if "no_repeat" in r.getMessage()]

    by_model = warned(model=hf)
    engine = cache.entries()[0].engine_dir
    assert by_model == warned(engine_dir=engine) == [
        f"{config} sets no_repeat_ngram_size=5, which kiln's sampling does not apply (HF "
        f"generate does): of its sampling fields kiln applies do_sample, temperature, top_k, "
        f"top_p, min_p and repetition_penalty"]
    own = shutil.copytree(engine, tmp_path / "engine")
    assert [said.split(" sets ")[0] for said in warned(engine_dir=own)] == [
        str(own / "generation_config.json")]


def test_the_engine_is_held_until_close(tiny_hf, cache):
    llm = LLM(model=tiny_hf)
    (entry,) = cache.entries()
    assert _busy(cache, entry.name)
    result = cache.prune(everything=True)
    assert result.removed == [] and [e.name for e in result.in_use] == [entry.name]
    llm.close()
    assert not _busy(cache, entry.name)
    assert [e.name for e in cache.prune(everything=True).removed] == [entry.name]


def test_an_llm_dropped_without_close_releases_its_engine(tiny_hf, cache):
    llm = LLM(model=tiny_hf)
    (entry,) = cache.entries()
    assert _busy(cache, entry.name)
    del llm
    gc.collect()
    assert not _busy(cache, entry.name)


def test_an_engine_dir_in_the_cache_is_held_too(tiny_hf, cache):
    with LLM(model=tiny_hf) as llm:
        engine = llm.engine_dir
    with LLM(engine):
        assert _busy(cache, engine.parent.name)
    assert not _busy(cache, engine.parent.name)


def test_a_device_this_machine_lacks_is_refused_before_the_build(tiny_hf, cache):
    from kiln.engine import EngineError

    with pytest.raises(EngineError, match="CUDA"):  # no CUDA here
        LLM(model=tiny_hf, options=ExecutorOptions(device="cuda"))
    assert cache.entries() == []


def test_limits_too_large_for_this_machine_name_the_keywords_to_pass(tiny_hf, cache):
    """LLM(model=...) builds from its keywords: its user is told to pass smaller ones, not to
    "rebuild" an engine no build of theirs made (as kiln run --model_dir is)."""
    from kiln.engine import EngineError

    with pytest.raises(EngineError, match="need a KV cache of .*; pass a smaller max_seq_len "
                                          "or max_batch_size$") as e:
        LLM(model=tiny_hf, max_batch_size=100_000_000, max_seq_len=64)
    assert "rebuild" not in str(e.value) and cache.entries() == []


def test_an_engine_that_fails_to_open_is_released(tiny_hf, cache, monkeypatch):
    from kiln.engine import EngineError

    def broken(*args, **kwargs):
        raise EngineError("the load failed")

    monkeypatch.setattr("kiln.runtime.onnx_executor.load_executor", broken)
    with pytest.raises(EngineError, match="the load failed"):  # after the build, at the load
        LLM(model=tiny_hf)
    (entry,) = cache.entries()
    assert not _busy(cache, entry.name)


@pytest.mark.parametrize("args, kwargs, message", [
    ((), {}, "LLM() takes an engine dir (LLM('engines/x')) or model=..."),
    (("engines/x",), {"model": "m"}, "not both"),
    (("engines/x",), {"max_batch_size": 2}, "LLM() got build options ['max_batch_size'] with an "
                                            "engine dir"),
    (("engines/x",), {"cpu_spin_wait": False}, "LLM() takes run-time options (cpu_spin_wait) "
                                               "through options=: pass "
                                               "options=ExecutorOptions(cpu_spin_wait=False)"),
    ((), {"model": "m", "dp": 2, "num_threads": 1}, "options=ExecutorOptions(dp=2, num_threads=1)"),
    (("engines/x", ExecutorOptions(dp=2)), {"dp": 2}, "LLM() got run-time options (dp) as "
                                                      "keywords beside options=; they go in"),
    ((123,), {}, "LLM() takes an engine dir as a str or Path, found int 123"),
    ((), {"model": ["m"]}, "LLM() takes model as a str or Path, found list ['m']"),
    (("engines/x", {"device": "cpu"}), {}, "LLM() takes options as ExecutorOptions(...), found "
                                           "dict"),
])
def test_wrong_combinations_are_type_errors(args, kwargs, message, cache):
    with pytest.raises(TypeError) as raised:
        LLM(*args, **kwargs)
    assert message in str(raised.value)
    assert not cache.dir.exists()


def test_an_unknown_build_option_is_named(tiny_hf, cache):
    with pytest.raises(ConfigError, match=r"^LLM\(\) got unknown options \['max_batch_sizes'\]"):
        LLM(model=tiny_hf, max_batch_sizes=2)
    with pytest.raises(ConfigError) as raised:  # beside an engine dir too (a retest's had been
        LLM("engines/x", max_batch_sizes=2, bogus=1, num_thread=2)  # called build options)
    assert str(raised.value) == (
        "LLM() got unknown options ['bogus', 'max_batch_sizes', 'num_thread'] (max_batch_sizes: "
        "did you mean max_batch_size, a build option of LLM(model=...)?; num_thread: did you "
        "mean options=ExecutorOptions(num_threads=...)?); beside an engine dir it takes its "
        "run-time options as options=ExecutorOptions(...), and build options with "
        "LLM(model=...) only")
    with pytest.raises(ConfigError) as raised:  # the CLI's --gqa_plugin disable
        LLM(model=tiny_hf, gqa_plugin="disable")
    assert "gqa_plugin: the API takes plugins={'gqa': 'enable'|'disable'|'auto'}" in \
        str(raised.value)
    with pytest.raises(ConfigError) as raised:  # LLM passes engine_for_model's check itself
        LLM(model=tiny_hf, check=print)
    assert "unknown options ['check']" in str(raised.value)
    assert " check," not in str(raised.value).partition("it takes")[2]


def test_a_hugging_face_dir_given_as_an_engine_dir_with_build_options_is_named(tiny_hf, cache):
    """A trial's LLM('models/x', max_seq_len=32) was told its Hugging Face checkpoint was an
    engine dir 'built already'."""
    with pytest.raises(TypeError) as raised:
        LLM(tiny_hf, max_seq_len=32)
    assert str(raised.value) == (f"LLM() got {tiny_hf} as an engine dir, and it is a Hugging Face "
                                 f"checkpoint: pass LLM(model={str(tiny_hf)!r}, ...) to build it "
                                 f"with ['max_seq_len']")
    assert not cache.dir.exists()


def test_async_llm_opens_and_closes_its_own_llm(tiny_hf, cache):
    async def main():
        async with AsyncLLM(model=tiny_hf, max_batch_size=2) as engine:
            (entry,) = cache.entries()
            assert _busy(cache, entry.name) and engine.llm.limits.max_batch_size == 2
            result = await engine.generate("Hello", GREEDY)
        return engine, entry, result

    engine, entry, result = asyncio.run(main())
    assert len(result.token_ids) == 4
    assert engine.llm.closed and not _busy(cache, entry.name)


def test_a_closed_llm_or_async_llm_names_the_form_it_was_opened_with(tiny_hf, cache):
    """A trial's closed LLM(model=...) had said "open the engine again (LLM(engine_dir))"."""
    from kiln.runtime.errors import EngineClosedError

    def closed(form: str):
        return pytest.raises(EngineClosedError, match=re.escape(f"({form})") + "$")

    llm = LLM(model=tiny_hf, max_seq_len=48)
    llm.close()
    with closed(f"LLM(model='{tiny_hf}', ...)"):
        llm.generate("Hello", GREEDY)
    with LLM(model=tiny_hf) as llm:
        engine_dir = llm.engine_dir
    with closed(f"LLM(model='{tiny_hf}')"):
        llm.generate("Hello", GREEDY)
    with LLM(engine_dir) as llm:
        pass
    with closed(f"LLM('{engine_dir}')"):
        llm.generate("Hello", GREEDY)
    engine = AsyncLLM(model=tiny_hf)
    engine.close()
    with closed(f"AsyncLLM(model='{tiny_hf}')"):
        asyncio.run(engine.submit("Hello", GREEDY))


def test_async_llm_over_an_llm_is_unchanged_and_takes_no_options(tiny_hf, cache):
    with LLM(model=tiny_hf) as llm:
        engine = AsyncLLM(llm)
        engine.close()
        assert not llm.closed  # handed back, not closed
        with pytest.raises(TypeError, match="takes no options"):
            AsyncLLM(llm, max_batch_size=2)
    with pytest.raises(TypeError, match="AsyncLLM\\(\\) takes an LLM or model=..."):
        AsyncLLM()
    with pytest.raises(TypeError, match="found int 123$"):
        AsyncLLM(123)
    with pytest.raises(TypeError, match=r"found str 'engines/x' \(an engine dir: "
                                        r"AsyncLLM\(LLM\('engines/x'\)\)\)"):
        AsyncLLM("engines/x")
