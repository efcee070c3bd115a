"""What made an output: its options and its inputs' fingerprints, recorded at the first start, checked on every resume.

Every output folder (a store being written, a run directory, an evaluation) records, before it writes anything, the
options and input fingerprints that define its content. A resume with different ones is refused with
:class:`OptionsChanged`, naming the option and both values; otherwise a resumed (or finished) output could silently
mix rows made two ways.

A fingerprint is ``sha256:<hex>`` of the bytes that define an input: a store's ``manifest.json`` (which holds every
shard's checksum, so it changes whenever any shard does), a file's content (a snapshot, a generator).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from toolkit.atomic import write_json


class OptionsChanged(ValueError):
    """An output is being resumed with other options or inputs than it was started with."""


def fingerprint(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a store's manifest (``path`` a store folder) or of a file."""
    path = Path(path)
    target = path / "manifest.json" if path.is_dir() else path
    digest = hashlib.sha256()
    with open(target, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as the JSON round trip gives them back (tuples → lists, paths → strings)."""
    return json.loads(json.dumps(options, default=str))


def compare(recorded: dict[str, Any], options: dict[str, Any], where: str | os.PathLike[str]) -> None:
    """Raise :class:`OptionsChanged` naming every option whose value differs between ``recorded`` and ``options``."""
    now = _plain(options)
    changed = [key for key in sorted(set(recorded) | set(now)) if recorded.get(key) != now.get(key)]
    if changed:
        detail = "; ".join(f"{key}: {recorded.get(key)!r} then, {now.get(key)!r} now" for key in changed)
        raise OptionsChanged(f"{where}: was made with other options ({detail}); use the same options to resume, "
                             "or a new output")


def claim(record: str | os.PathLike[str], options: dict[str, Any]) -> bool:
    """Record ``options`` in the JSON file ``record``, or check them against what it holds; True when it existed.

    The caller holds the folder's :class:`~toolkit.lock.WriterLock`, so no other process writes ``record``.
    """
    record = Path(record)
    if record.exists():
        try:
            recorded = json.loads(record.read_text())
        except ValueError as err:
            raise OptionsChanged(f"{record}: unreadable options record ({err})") from None
        compare(recorded, options, record.parent)
        return True
    write_json(record, _plain(options))
    return False
