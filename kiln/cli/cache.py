"""``kiln cache``: the build cache of engines made from Hugging Face checkpoints.

``kiln cache list`` shows the entries (size, backend, last use, source), ``kiln cache prune``
removes entries (``--all``, ``--older_than 7d``, ``--max_size 20GB``: least recently used first)
and the leftovers of builds that did not finish, ``kiln cache build`` converts and builds a
model into the cache (or finds it there) and prints its engine dir. docs/build_cache.md.

Listing and pruning import no torch (kiln/cli/main.py registers the group as not heavy); ``kiln
cache build`` imports it first with Ctrl-C deferred, as every heavy command does. Its options
are those of ``--model_dir`` on kiln run, bench and eval (kiln/cli/engine_source.py).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from kiln.cli.build import MemorySize
from kiln.cli.context import CliContext, PathArg
from kiln.cli.engine_source import CACHE_DIR_HELP, engine_from_options, model_options

_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h|d|w)\s*", re.IGNORECASE)
_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Duration(click.ParamType):
    """A duration: 7d, 12h, 30min, 90s, 2w (seconds)."""

    name = "duration"

    def convert(self, value, param, ctx) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        match = _DURATION.fullmatch(str(value))
        if match is None:
            self.fail(f"{value!r} is not a duration like 7d, 12h, 30min or 90s", param, ctx)
        return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def _cache_dir_option(func):
    return click.option("--cache_dir", type=PathArg(file_okay=False, path_type=Path),
                        help=CACHE_DIR_HELP)(func)


@click.group("cache")
def cache() -> None:
    """The build cache of engines made from Hugging Face checkpoints: list, prune, build.

    Entries live in $KILN_CACHE_DIR/engines (default ~/.cache/kiln/engines); docs/build_cache.md.
    """


# -- list ---------------------------------------------------------------------------------

@cache.command("list")
@_cache_dir_option
def list_entries(cache_dir: Path | None) -> None:
    """Show the cached engines: name, size, backend, last use, source."""
    from kiln.build_cache.store import Busy, EngineCache

    store = EngineCache(cache_dir)
    entries = store.entries()[::-1]  # most recently used first
    names, leftovers, foreign = store.names()
    sizes = [e.size() for e in entries]
    click.echo(f"{store.dir}: {len(entries)} cached engine{'s' * (len(entries) != 1)}, "
               f"{_size(sum(sizes))}")
    rows = []
    for entry, size in zip(entries, sizes, strict=True):
        try:
            with store.locked(entry.name, write=True, wait=False):
                state = ""
        except Busy:
            state = " (in use)"
        rows.append((entry.name, _size(size), entry.backend, _ago(entry.last_used),
                     entry.source + state))
    if rows:
        header = ("NAME", "SIZE", "BACKEND", "LAST USED", "SOURCE")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            click.echo("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
                       + "  " + row[4])
    incomplete = [n for n in names if store.read(n) is None]
    if leftovers:
        click.echo(f"{len(leftovers)} leftover{'s' * (len(leftovers) != 1)} of builds that did "
                   f"not finish (in progress, or killed: kiln cache prune removes the latter)")
    for path in [*(store.dir / n for n in incomplete), *foreign]:
        click.echo(f"not made by the cache, left alone: {path}")


# -- prune --------------------------------------------------------------------------------

@cache.command("prune")
@click.option("--all", "everything", is_flag=True, help="Remove every entry not in use.")
@click.option("--older_than", type=Duration(),
              help="Remove entries last used longer ago than this (7d, 12h, 30min).")
@click.option("--max_size", type=MemorySize(),
              help="Remove least recently used entries until the cache holds at most this "
                   "(20GB, 512MiB).")
@click.option("--dry_run", is_flag=True, help="Say what would be removed; remove nothing.")
@_cache_dir_option
@click.pass_obj
def prune(obj: CliContext, everything: bool, older_than: float | None, max_size: int | None,
          dry_run: bool, cache_dir: Path | None) -> None:
    """Remove cached engines (never one in use, never anything the cache did not create)."""
    from kiln.build_cache.store import EngineCache

    store = EngineCache(cache_dir)
    if not store.dir.is_dir():
        click.echo(f"{store.dir}: no build cache here; nothing to prune")
        return
    result = store.prune(everything=everything, older_than=older_than, max_size=max_size,
                         dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for entry in result.removed:
        click.echo(f"{verb} {entry.name} ({entry.backend}, {entry.source}, last used "
                   f"{_ago(entry.last_used)})")
    for entry in result.in_use:
        click.echo(f"kept {entry.name}: in use by another process ({entry.source})", err=True)
    for _, why in result.refused:
        click.echo(f"left alone: {why}", err=True)
    for path in result.leftovers:
        click.echo(f"removed {path.name} (left by a build or prune that did not finish)")
    if not (everything or older_than is not None or max_size is not None):
        click.echo("no entries selected: pass --all, --older_than or --max_size", err=True)
    click.echo(f"{verb} {len(result.removed)} cached engine{'s' * (len(result.removed) != 1)}, "
               f"{_size(result.freed)}; {len(store.entries())} left in {store.dir}")


# -- build --------------------------------------------------------------------------------

@cache.command("build")
@model_options
@click.pass_obj
def build(obj: CliContext, **options) -> None:
    """Convert and build a Hugging Face checkpoint into the cache, or find it there; print the
    engine dir."""
    from kiln.interrupts import deferred_interrupts

    with deferred_interrupts():  # an interrupt inside these imports breaks numpy (kiln/cli/main.py)
        import torch  # noqa: F401
    click.echo(str(engine_from_options(obj, options)))


def _size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _ago(when: float) -> str:
    seconds = max(time.time() - when, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"
