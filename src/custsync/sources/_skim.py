"""Skimming a JSON Lines list document: its resources' update times read without building
the resources, and only those an incremental run keeps built (``Skimmer``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from custsync.model import parse_timestamp

_BOM = b"\xef\xbb\xbf"
# The escapes that could spell a character of the names counted (``_`` and ``a`` to ``z``)
# another way. Others are common (Rails, by default, writes ``&``, ``<`` and ``>`` as
# ``\u0026``, ``\u003c`` and ``\u003e``) and harmless: they cannot hide a name.
_NAME_ESCAPE = re.compile(rb"\\u00(?:5[fF]|6[1-9a-fA-F]|7[0-9aA])")
# The names counted in a line's bytes (see ``Skimmer``).
_ATTRIBUTES = b'"attributes"'
_UPDATED_AT = b'"updated_at"'
# A longer line is read the general way: the parser keeps buffers the size of the largest
# document it has read for as long as it lives.
_LIMIT = 16 << 20


@dataclass(slots=True)
class Skimmed:
    """A list document, skimmed: what the general read would have made of it."""

    count: int  # resources in ``data``
    skipped: int  # of them older than the lower bound, left unbuilt
    newest: datetime | None  # the newest skipped one's time
    kept: list[tuple[int, dict[str, Any]]]  # (position in ``data``, resource), built
    included: Any  # the document's ``included`` as built (only a list is looked in), or None


class Skimmer:
    """Skims lines with one simdjson parser, reused from line to line.

    An incremental run over a full export skips most of its input, and the general read
    (orjson) builds every resource's dicts and strings only to drop nine in ten of them.
    simdjson parses a line into its own compact form several times faster; the update
    times are read from that, and the resources kept are built from it. The result must
    be exactly the general read's, or nothing (``None``: the caller then reads the line
    the general way), so a skim gives up wherever the two parsers could differ:

    - a line either parser refuses (simdjson refuses more: integers beyond 64 bits, some
      malformed text; the general read then says what is wrong, or reads it);
    - a byte order mark at the start (simdjson skips it, orjson refuses the line);
    - a line over 16 MiB (the parser would keep buffers that size for the rest of the run);
    - a repeated key where it decides the skip: orjson keeps an object's last value,
      simdjson's look-ups find the first. Asking simdjson for every object's keys costs
      more than the skim saves, so the line's bytes are counted instead: the skim is used
      only when ``"attributes"`` and ``"updated_at"`` occur in them exactly as often as
      the resources and included objects hold those keys, so no object repeats one (a
      repeat, or the name anywhere else, a value or a ``metadata`` key, only sends the
      line the general way). A name may also be written with escapes
      (``"updated\\u005fat"``): a line with an escaped ``_`` or lower-case letter is never
      skimmed.
    """

    def __init__(self) -> None:
        import simdjson  # only incremental runs over JSON Lines skim

        self._simdjson = simdjson
        self._parser = simdjson.Parser()

    def skim(self, line: bytes, since: datetime) -> Skimmed | None:
        """The list document on ``line``, its resources older than ``since`` skipped; None
        where the general read must decide (see the class's notes)."""
        if (
            len(line) > _LIMIT
            or line.startswith(_BOM)
            or (b"\\" in line and _NAME_ESCAPE.search(line) is not None)
        ):
            return None
        try:
            return self._skim(line, since)
        except Exception:  # noqa: BLE001 - whatever simdjson refuses, the general read judges
            # The parser is not reused while objects of its last document live on (a
            # traceback may hold some): the next line gets a new one.
            self._parser = self._simdjson.Parser()
            return None

    def _skim(self, line: bytes, since: datetime) -> Skimmed | None:
        simdjson = self._simdjson
        document = self._parser.parse(line)
        if not isinstance(document, simdjson.Object):
            return None
        names = list(document.keys())
        if "attributes" in names or len(set(names)) != len(names):
            return None  # a single resource, or a document repeating a key
        data = document.get("data")
        if not isinstance(data, simdjson.Array):
            return None
        # How many objects hold each name, as found: checked against the bytes below.
        attributes_held = updated_held = 0
        kept: list[tuple[int, Any]] = []  # built once the counts below agree
        skipped, newest = 0, None
        for k, resource in enumerate(data):
            if not isinstance(resource, simdjson.Object):
                return None
            attributes = resource.get("attributes")
            stamp = None
            if attributes is not None:
                attributes_held += 1
                if isinstance(attributes, simdjson.Object):
                    updated = attributes.get("updated_at")
                    if updated is not None:
                        updated_held += 1
                        if updated.__class__ is str:
                            stamp = parse_timestamp(updated)
            if stamp is not None and stamp < since:
                skipped += 1
                if newest is None or stamp > newest:
                    newest = stamp
                continue
            kept.append((k, resource))
        included = document.get("included")
        if isinstance(included, simdjson.Array):
            for item in included:
                attributes = item.get("attributes") if isinstance(item, simdjson.Object) else None
                if attributes is not None:
                    attributes_held += 1
                    if (
                        isinstance(attributes, simdjson.Object)
                        and attributes.get("updated_at") is not None
                    ):
                        updated_held += 1
        if line.count(_ATTRIBUTES) != attributes_held or line.count(_UPDATED_AT) != updated_held:
            return None
        # Only a list of included objects is looked in (``index_included``).
        built = included.as_list() if kept and isinstance(included, simdjson.Array) else None
        resources = [(k, resource.as_dict()) for k, resource in kept]
        return Skimmed(len(data), skipped, newest, resources, built)
