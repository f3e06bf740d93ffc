"""What an interrupted conversion leaves beside the store, and whose it is.

Everything is written to ``STORE.partial.<tag>`` (and ``STORE.staging.<tag>``), the tag naming
the owner (pid, pid namespace, a random id, host), and renamed to ``STORE`` only once complete
(``install``). ``remove_stale`` removes leftovers only when their owner is a process of this host
and pid namespace that is gone."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pipeline.data.store import store_state
from pipeline.procs import Owner

LEFTOVER_KINDS = ("partial", "staging", "old")


def leftover_path(out: Path, kind: str) -> Path:
    """``STORE.<kind>.<pid>.<pid namespace>.<random id>.<host>``: a folder this process owns
    beside the store (the host last: it may hold dots)."""
    me = Owner.me()
    host = me.host.replace(os.sep, "_") or "unknown"
    return out.parent / f"{out.name}.{kind}.{me.pid}.{me.namespace}.{uuid.uuid4().hex[:8]}.{host}"


def leftover_owner(out: Path, path: Path) -> tuple[str, Owner | None] | None:
    """(kind, owner) of a folder left beside the store ``out``; owner None for the names
    of older versions (``STORE.<kind>-<pid>-<id>``, no host: nobody can tell whose it is);
    None for anything else."""
    rest = path.name[len(out.name) + 1 :] if path.name.startswith(out.name + ".") else ""
    for kind in LEFTOVER_KINDS:
        if rest.startswith(kind + "."):
            parts = rest[len(kind) + 1 :].split(".", 3)
            try:
                pid, ns = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                return None
            return (kind, Owner(parts[3], ns, pid)) if len(parts) == 4 else None
        if rest.startswith(kind + "-"):
            return kind, None
    return None


def remove_stale(out: Path) -> list[tuple[Path, str]]:
    """Remove partial/staging folders of conversions whose process is gone, and old stores
    left by a replacement that was cut short once the store is there again. Only owners of
    this host and pid namespace can be checked: other hosts', other containers' and
    unnamed (older versions') leftovers are kept; returns those [(path, why)]."""
    kinds = LEFTOVER_KINDS if store_state(out) == "complete" else ("partial", "staging")
    kept = []
    for p in sorted(out.parent.glob(f"{out.name}.*")):
        found = leftover_owner(out, p)
        if found is None or found[0] not in kinds:
            continue
        owner = found[1]
        if owner is None:
            kept.append((p, "left by an older convpipe, which did not record its host"))
        elif not owner.is_local():
            kept.append(
                (
                    p,
                    f"owned by pid {owner.pid} of host {owner.host} (pid namespace "
                    f"{owner.namespace}), which cannot be checked from here",
                )
            )
        elif not owner.alive():
            shutil.rmtree(p, ignore_errors=True)
    return kept


def install(partial: Path, out: Path) -> None:
    """Move the complete store into place; an old one is removed only afterwards."""
    if out.exists():
        old = leftover_path(out, "old")
        os.rename(out, old)
        try:
            os.rename(partial, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, out)
