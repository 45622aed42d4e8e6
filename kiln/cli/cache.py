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

import math
import re
import time
from pathlib import Path

import click

from kiln.cli.context import CliContext, MemorySize, PathArg
from kiln.cli.engine_source import CACHE_DIR_HELP, engine_from_options, model_options
from kiln.errors import counted
from kiln.sizes import size_text

_DURATION = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(s|sec|m|min|h|d|w)\s*",
                       re.IGNORECASE)
_SECONDS = {"s": 1, "sec": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_RULE = ("a number with its unit: s, min, h, d or w (7d, 12h, 30min, 0s); a bare number "
                 "is refused, 0 included (7 days or 7 seconds? --max_size's bare number is "
                 "bytes, its smallest unit, which deletes less, not more)")


class Duration(click.ParamType):
    """A duration: a number with its unit (:data:`DURATION_RULE`), in seconds."""

    name = "duration"

    def convert(self, value, param, ctx) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        match = _DURATION.fullmatch(str(value))
        if match is None:
            self.fail(f"{value!r} is not a duration: give a number with its unit, s, min, h, d "
                      f"or w (7d, 12h, 30min, 90s)", param, ctx)
        number, unit = match.group(1), match.group(2).lower()
        if unit == "m":  # minutes or months: a mistake either way removes far too much
            self.fail(f"{value!r} is ambiguous (minutes or months?): write {number}min, or "
                      f"{number}d, {number}w for longer", param, ctx)
        seconds = float(number) * _SECONDS[unit]
        if seconds < 0:  # -1d had been "not a duration"
            self.fail(f"{value!r} is a negative duration: give 0s or more", param, ctx)
        if not math.isfinite(seconds):  # 1e400d: a duration, past what a float holds
            self.fail(f"{value!r} is longer than any duration kiln can count: give a number a "
                      f"float holds, such as 3650d", param, ctx)
        return seconds


def _existing(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Refuse a ``--cache_dir`` that does not exist, or that is a cache's engines dir (list
    prints that one, so a user may pass it): list and prune only read, and a path typed for
    one command that is not a cache root is likelier a slip than an empty cache (they had
    reported "0 cached engines" and "nothing to prune"). The default root ($KILN_CACHE_DIR,
    ...) not made yet is a fresh machine's: no error (the first build makes it)."""
    from kiln.build_cache.store import EngineCache

    if value is None:
        return value
    root = value.expanduser().absolute()
    if not root.exists():
        # (the absolute path: ./- had been shown as "-", a command that reads it as stdout)
        raise click.BadParameter(f"{root}: no such directory; check the path (kiln cache "
                                 f"build --cache_dir {root} makes a cache there)", ctx, param)
    parent = EngineCache(root.parent)
    if not EngineCache(root).dir.exists() and parent.dir == root \
            and any(parent.names()[:2]):  # cached engines or leftovers
        raise click.BadParameter(f"{value} is the engines dir of the cache at {parent.root}; "
                                 f"give that, the cache's root", ctx, param)
    return value


def _cache_dir_option(func):
    """``--cache_dir`` of list and prune: an existing directory (kiln cache build's, from
    engine_source, makes its own)."""
    return click.option("--cache_dir", type=PathArg(file_okay=False, path_type=Path),
                        callback=_existing, help=CACHE_DIR_HELP)(func)


@click.group("cache")
def cache() -> None:
    """The build cache of engines made from Hugging Face checkpoints: list, prune, build.

    Entries live in $KILN_CACHE_DIR/engines (else $XDG_CACHE_HOME/kiln/engines, else
    ~/.cache/kiln/engines); docs/build_cache.md.
    """


# -- list ---------------------------------------------------------------------------------

@cache.command("list")
@_cache_dir_option
def list_entries(cache_dir: Path | None) -> None:
    """Show the cached engines: name, size, backend, last use, the options that built them
    (dtype, mapping, targets, build options not at their defaults), source."""
    from kiln.build_cache.store import EngineCache, Unwritable, describe_options, dir_size
    from kiln.errors import BuildCacheError

    store = EngineCache(cache_dir)
    store.check_dir()
    if not store.dir.is_dir():  # the default root on a fresh machine, or a root without one
        click.echo(f"{store.dir}: no build cache here yet (kiln cache build makes it, as "
                   f"--model_dir on kiln run, bench and eval does)")
        return
    entries = store.entries()[::-1]  # most recently used first
    names, leftovers, foreign = store.names()
    sizes = [e.size() for e in entries]
    leftover_sizes = [dir_size(p) for p in leftovers]
    # leftovers apart: a build in progress is not a cached engine's size (a trial read the
    # header's total as its one entry's)
    extra = (f" (and {counted(len(leftovers), 'leftover')}, "
             f"{size_text(sum(leftover_sizes), 'si')})" if leftovers else "")
    click.echo(f"{store.dir}: {counted(len(entries), 'cached engine')}, "
               f"{size_text(sum(sizes), 'si')}{extra}")
    rows, lock_problems, read_only = [], [], False
    for entry, size in zip(entries, sizes, strict=True):
        try:
            state = " (in use)" if store.in_use(entry.name) else ""
        except Unwritable:
            state, read_only = "", True
        except BuildCacheError as e:
            state = " (lock unreadable)"
            lock_problems.append(str(e))
        rows.append((entry.name, size_text(size, "si"), entry.backend, _ago(entry.last_used),
                     describe_options(entry.parts), entry.source + state))
    if rows:
        _table(("NAME", "SIZE", "BACKEND", "LAST USED", "OPTIONS", "SOURCE"), rows)
    incomplete = [n for n in names if store.read(n) is None]
    for path, size in zip(leftovers, leftover_sizes, strict=True):
        click.echo(f"leftover of a build or prune that did not finish "
                   f"({size_text(size, 'si')}; in progress, or killed: kiln cache prune removes "
                   f"the latter): {path}")
    for path in [*(store.dir / n for n in incomplete), *foreign]:
        click.echo(f"not made by the cache, left alone: {path}")
    for problem in lock_problems:
        click.echo(problem, err=True)
    if read_only:
        click.echo(f"{store.dir}: its lock files cannot be written (a read-only cache?): "
                   f"which entries are in use is unknown", err=True)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one as is."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True))
                   + "  " + row[-1])


# -- prune --------------------------------------------------------------------------------

@cache.command("prune")
@click.option("--all", "everything", is_flag=True,
              help="Remove every entry not in use (alone: --older_than and --max_size select "
                   "some entries, --all every one).")
@click.option("--older_than", type=Duration(),
              help=f"Remove entries last used longer ago than this: {DURATION_RULE}.")
@click.option("--max_size", type=MemorySize(),
              help="Remove least recently used entries until the cache holds at most this "
                   "(20GB, 512MiB; a bare number is bytes). With --older_than: both apply "
                   "(entries either selects go).")
@click.option("--leftovers", "leftovers_only", is_flag=True,
              help="Remove only the leftovers of builds and prunes that did not finish (every "
                   "prune removes them too).")
@click.option("--dry_run", is_flag=True, help="Say what would be removed; remove nothing.")
@_cache_dir_option
@click.pass_obj
def prune(obj: CliContext, everything: bool, older_than: float | None, max_size: int | None,
          leftovers_only: bool, dry_run: bool, cache_dir: Path | None) -> None:
    """Remove cached engines (never one in use, never anything the cache did not create) and
    the leftovers of builds that did not finish. Give one of --all, --older_than / --max_size,
    --leftovers."""
    from kiln.build_cache.store import EngineCache

    selectors = [name for name, given in (("--older_than", older_than is not None),
                                          ("--max_size", max_size is not None)) if given]
    if everything and (selectors or leftovers_only):
        raise click.UsageError(f"--all removes every entry; "
                               f"{' and '.join(selectors) or '--leftovers'} select"
                               f"{'s' * (len(selectors) < 2)} fewer: give one or the other")
    if leftovers_only and selectors:
        raise click.UsageError(f"--leftovers removes no entry; drop it or "
                               f"{' and '.join(selectors)}")
    if not (everything or selectors or leftovers_only):
        raise click.UsageError("say what to remove: --all, --older_than 7d, --max_size 20GB "
                               "or --leftovers (add --dry_run to see what would go)")
    store = EngineCache(cache_dir)
    store.check_dir()
    if not store.dir.is_dir():
        click.echo(f"{store.dir}: no build cache here; nothing to prune")
        return
    if not dry_run:
        store.ensure()  # a read-only cache: one line, not one per entry
    result = store.prune(everything=everything, older_than=older_than, max_size=max_size,
                         dry_run=dry_run)
    _report(store, result, dry_run)


def _report(store, result, dry_run: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for entry in result.removed:
        click.echo(f"{verb} {entry.name} ({entry.backend}, {entry.source}, last used "
                   f"{_ago(entry.last_used)})")
    for entry in result.in_use:
        click.echo(f"{'would keep' if dry_run else 'kept'} {entry.name}: in use by another "
                   f"process ({entry.source})", err=True)
    for _, why in result.refused:
        click.echo(f"left alone: {why}", err=True)
    for path, size in result.leftovers:
        click.echo(f"{verb} {path.name} ({size_text(size, 'si')}, left by a build or prune "
                   f"that did not finish)")
    left = len(store.entries()) - (len(result.removed) if dry_run else 0)
    leftovers = ""
    if result.leftovers:
        n = len(result.leftovers)
        leftovers = (f" and {n} leftover{'s' * (n != 1)}, "
                     f"{size_text(sum(size for _, size in result.leftovers), 'si')}")
    click.echo(f"{verb} {len(result.removed)} cached engine{'s' * (len(result.removed) != 1)}, "
               f"{size_text(result.freed, 'si')}{leftovers}; {left} left in {store.dir}")
    if result.unlocked:
        click.echo(f"{store.dir}: its lock files cannot be written (a read-only cache?): which "
                   f"entries are in use is unknown, and prune itself needs a writable cache",
                   err=True)


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


def _ago(when: float) -> str:
    seconds = max(time.time() - when, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"
