"""Plugin specs, the registry, and how a build's plugin switches resolve to forms.

A plugin is a fused operation with two ONNX forms: *fused* (one standard op or one
model-local function that TensorRT maps to a native fused layer, ONNX Runtime runs directly)
and *decomposed* (plain elementwise/matmul ops). Both must compute the same thing; the
build switch ``--<name>_plugin auto|enable|disable`` picks one per build:

- ``enable``: the fused form; an error (with the reason) if it cannot be used here.
- ``disable``: the decomposed form.
- ``auto``: the fused form where it can be used, else the decomposed one; the choice and its
  reason are logged.

A plugin that does not occur in a model (the gated MLP of a GELU model) resolves to False;
``enable`` on it is an error. A fused plugin may replace others (``replaces``: gqa does the
work of attention, rotary and kv_cache): they still resolve to True (the manifest records
the switches), but the graph holds none of their forms. One INFO line says what the graph
holds: ``plugins fused: ...; replaced by gqa: ...; decomposed: ...; not in the model: ...``.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

from kiln.config import DecoderConfig
from kiln.errors import ConfigError, option, shown

log = logging.getLogger(__name__)


class PluginMode(str, Enum):
    AUTO = "auto"
    ENABLE = "enable"
    DISABLE = "disable"


@dataclass(frozen=True)
class PluginContext:
    """What decides whether a fused form can be used: the model, precision and backend."""

    decoder: DecoderConfig
    dtype: str
    backend: str
    targets: tuple[str, ...] = ()
    tp_size: int = 1
    requested: dict[str, PluginMode] = field(default_factory=dict)  # the build's switches

    def onnxruntime_cpu(self) -> str | None:
        """None when the graph is built for ONNX Runtime's CPU provider, else why not (the
        blocker of fused forms that are ONNX Runtime CPU contrib ops)."""
        if self.backend != "onnx" or tuple(self.targets) != ("cpu",):
            return (f"an ONNX Runtime CPU op; this build is for {self.backend} "
                    f"{','.join(self.targets) or 'default targets'}")
        return None


@dataclass(frozen=True)
class PluginSpec:
    """One fused operation (see the module docstring).

    ``occurs(decoder)`` returns None when the model uses the operation, else why not;
    ``fused_blocker(ctx)`` returns None when the fused form can be used, else why not.
    ``trt_layers`` names the TensorRT layer types the fused form becomes (tests look for them).
    """

    name: str
    summary: str
    fused_form: str
    decomposed_form: str
    occurs: Callable[[DecoderConfig], str | None]
    fused_blocker: Callable[[PluginContext], str | None]
    trt_layers: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()  # plugins whose work the fused form does (not emitted then)

    @property
    def option(self) -> str:
        return f"{self.name}_plugin"


PLUGINS: dict[str, PluginSpec] = {}


def register_plugin(spec: PluginSpec) -> PluginSpec:
    if spec.name in PLUGINS:
        raise ValueError(f"plugin {spec.name!r} registered twice")
    PLUGINS[spec.name] = spec
    return spec


def plugin_option(name: str, *value: str) -> str:
    """Plugin ``name``'s switch (and ``value``) in a message as its user gave it
    (:func:`~kiln.errors.option`): from Python ``plugins['attention']``, inside a kiln command
    ``--attention_plugin`` (a trial's ``plugins={"attention": "on"}`` had been told of an
    ``attention_plugin`` it had no way to pass)."""
    return option(f"plugins[{name!r}]", *value, flag=f"{name}_plugin")


def parse_mode(name: str, value: str | PluginMode) -> PluginMode:
    try:
        return PluginMode(value)
    except ValueError:
        choices = ", ".join(m.value for m in PluginMode)
        raise ConfigError(f"{plugin_option(name)} must be one of {choices}, found "
                          f"{shown(value)}") from None


def check_names(modes: dict[str, str | PluginMode]) -> None:
    """ConfigError naming the plugins of ``modes`` that are none of :data:`PLUGINS` (and the
    one each likely meant): checked before their modes, so that ``{"bogus": True}`` is told its
    name first, not its mode and then, once mended, its name (a retest)."""
    unknown = sorted(set(modes) - set(PLUGINS), key=str)
    if unknown:
        meant = [f"{name!r} -> {close[0]!r}" for name in unknown
                 if (close := difflib.get_close_matches(str(name).lower(), PLUGINS, 1))]
        hint = f" (did you mean {', '.join(meant)}?)" if meant else ""
        raise ConfigError(f"unknown plugins {unknown}{hint}; known: {sorted(PLUGINS)}")


def resolve_plugins(modes: dict[str, str | PluginMode], ctx: PluginContext) -> dict[str, bool]:
    """Every registered plugin -> whether its fused form is used (see the module docstring)."""
    check_names(modes)
    requested = {name: parse_mode(name, modes.get(name, PluginMode.AUTO)) for name in PLUGINS}
    ctx = replace(ctx, requested=requested)
    forms = {name: _resolve_one(spec, requested[name], ctx)
             for name, spec in sorted(PLUGINS.items())}
    _log_forms(forms, requested)
    return {name: form == FUSED for name, form in forms.items()}


FUSED, DECOMPOSED, ABSENT = "fused", "decomposed", "not in the model"  # one plugin's outcome


def _resolve_one(spec: PluginSpec, mode: PluginMode, ctx: PluginContext) -> str:
    absent = spec.occurs(ctx.decoder)
    if absent is not None:
        if mode is PluginMode.ENABLE:
            raise ConfigError(f"{plugin_option(spec.name, 'enable')}: {absent}; use auto or "
                              f"disable")
        log.debug("%s plugin: not used (%s)", spec.name, absent)
        return ABSENT
    if mode is PluginMode.DISABLE:
        log.debug("%s plugin: disabled, decomposed form (%s)", spec.name, spec.decomposed_form)
        return DECOMPOSED
    blocker = spec.fused_blocker(ctx)
    if blocker is not None:
        if mode is PluginMode.ENABLE:
            raise ConfigError(f"{plugin_option(spec.name, 'enable')}: {blocker}; use auto or "
                              f"disable")
        log.info("%s plugin: auto chose the decomposed form (%s)", spec.name, blocker)
        return DECOMPOSED
    return FUSED


def _log_forms(forms: dict[str, str], requested: dict[str, PluginMode]) -> None:
    """The fused choices (DEBUG, one line each) and what the graph holds (one INFO line)."""
    replaced_by = {name: spec.name for spec in PLUGINS.values() if forms[spec.name] == FUSED
                   for name in spec.replaces if forms.get(name) == FUSED}
    groups: dict[str, list[str]] = {}
    for name, form in forms.items():
        if name in replaced_by:
            by = replaced_by[name]
            log.debug("%s plugin: replaced by %s (%s)", name, by, PLUGINS[by].fused_form)
            groups.setdefault(f"replaced by {by}", []).append(name)
            continue
        if form == FUSED:
            log.debug("%s plugin: %s, fused form (%s)", name, "enabled"
                      if requested[name] is PluginMode.ENABLE else "auto enabled",
                      PLUGINS[name].fused_form)
        groups.setdefault(form, []).append(name)
    order = [FUSED, *sorted(k for k in groups if k.startswith("replaced")), DECOMPOSED, ABSENT]
    log.info("plugins %s", "; ".join(f"{label}: {', '.join(sorted(groups[label]))}"
                                      for label in order if label in groups))


def always(_: object) -> None:
    """For ``occurs``/``fused_blocker``: no restriction."""
    return None
