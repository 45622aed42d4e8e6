"""The checks a cache miss runs before it converts: bad options refused in seconds, not after
the conversion and build they would otherwise wait for.

Contract: :func:`planned_manifest` runs, from the HF config and tensor headers alone (no tensor
data read, but a tied checkpoint's stored LM head, compared with the embedding), every check that conversion (:func:`~kiln.converters.convert.plan_conversion`) and
the build (:func:`~kiln.builder.api.make_plan`, the backend's ``check``) run before they write,
and returns the conversion's plan (which the build then writes: the source is read once) and
the engine manifest the build would write, less its files. A caller that will run
the engine checks that manifest against this machine (``engine_for_model(check=...)``:
:func:`kiln.runtime.loader.check_runnable`); ``kiln cache build`` does not, so a TensorRT engine
can still be built ahead of time on a machine without a GPU.

Non-goals: a cache hit runs none of this (its engine's own manifest is checked when it opens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.build_cache.key import KeyParts, SourceId
from kiln.engine import EngineManifest

if TYPE_CHECKING:
    from kiln.converters.convert import ConversionPlan


def planned_manifest(source: SourceId, parts: KeyParts,
                     build: Any) -> tuple[ConversionPlan, EngineManifest]:
    """The conversion's plan, and the manifest of the engine ``build`` (resolved
    :class:`~kiln.builder.options.BuildOptions`) would make from ``source`` converted with
    ``parts.convert``; raises what conversion or the build would raise first. The build
    converts with that plan (its source's config and headers are read once)."""
    from kiln.builder.api import make_plan, plan_manifest
    from kiln.builder.backends import get_backend
    from kiln.converters.convert import plan_conversion

    conversion = plan_conversion(source.model_dir, revision=source.revision, **parts.convert)
    engine = get_backend(build.backend)
    # (the build's own checkpoint dir is a temporary one: a message names the model's config)
    plan = make_plan(build, conversion.checkpoint_config(), engine,
                     config=conversion.source.directory / "config.json")
    engine.check(plan)
    return conversion, plan_manifest(plan, engine, rank_files={}, checksums={})
