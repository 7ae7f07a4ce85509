"""The JSON text of a stored document body, and how each dialect bends it.

A body (the encoded document without ``_id``/``_version``) is stored as JSON
text.  :meth:`BodyText.dump` writes it with one ``json.dumps`` call; only when
the dialect's :attr:`BodyText.care` pattern finds something in that text is the
body written again value by value through the dialect's hooks, so a common
document costs one ``dumps``.  :meth:`BodyText.load` parses the text and undoes
the hooks.

The base class is the form SQLite stores: strings through :func:`escape_text`,
everything else as ``json.dumps`` writes it.  PostgreSQL (floats in positional
notation, ``-0.0`` kept aside as fixups) and MariaDB/MySQL (keys mapped by
``mysql_key``, floats always with a decimal point, strings unescaped) override
the hooks in their own modules.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from ptutils.errors import StorageError

_ESCAPED = re.compile("\x01([\x01\x02])")


def escape_text(value: str) -> str:
    """A string as stored on SQLite and PostgreSQL: U+0000 -> U+0001 U+0001, U+0001 -> U+0001 U+0002.

    SQLite's JSON functions end a string at U+0000 and PostgreSQL cannot hold it
    at all.  This code is injective and keeps code point order (U+0001 starts
    both two-character codes, every other character stands for itself, and no
    code is a prefix of another), so comparing escaped strings is comparing the
    originals; query values are escaped the same way and reads undo it.
    """
    if "\x00" not in value and "\x01" not in value:
        return value
    return value.replace("\x01", "\x01\x02").replace("\x00", "\x01\x01")


def unescape_text(value: str) -> str:
    """The string that :func:`escape_text` turned into ``value``."""
    return _ESCAPED.sub(lambda m: "\x00" if m.group(1) == "\x01" else "\x01", value)


def unescape_values(value: Any) -> Any:
    """A parsed body with every string passed through :func:`unescape_text` (keys are never escaped)."""
    if isinstance(value, str):
        return unescape_text(value) if "\x01" in value else value
    if isinstance(value, dict):
        return {k: unescape_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unescape_values(v) for v in value]
    return value


class BodyText:
    """How one dialect writes a document body as JSON text, and reads it back.

    A dialect changes :attr:`care` and the hooks :meth:`stored`, :meth:`key`,
    :meth:`number` and :meth:`restore`; :meth:`dump` and :meth:`load` are shared.
    """

    care: ClassVar[re.Pattern[str]] = re.compile(r"\\u000[01]")
    """Matches the ``json.dumps`` text of a body that the hooks would write differently."""

    def stored(self, value: str) -> str:
        """A string as this dialect stores it, in bodies and in bound query values."""
        return escape_text(value)

    def key(self, key: str) -> str:
        """An object key as this dialect stores it."""
        return key

    def number(self, value: float, path: list, fixups: list) -> str:
        """The JSON text of the float at ``path``; a value the text cannot carry is added to ``fixups``."""
        return repr(value)

    def restore(self, text: str, body: dict) -> dict:
        """Undo what the hooks changed in ``body``, parsed from the stored ``text``."""
        return unescape_values(body) if "\\u0001" in text else body

    def dump(self, body: dict) -> tuple[str, str | None]:
        """JSON text of a stored body, and the fixups as JSON ``[[path, value], ...]`` (or None)."""
        try:
            text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StorageError(f"document is not plain JSON after encoding: {exc}") from exc
        if not self.care.search(text):
            return text, None
        fixups: list = []
        text = self._dump_value(body, fixups, [])
        return text, (json.dumps(fixups) if fixups else None)

    def load(self, text: Any, fixups: str | None) -> dict:
        """The body stored as ``text`` with ``fixups`` (as :meth:`dump` returned them)."""
        body = self.restore(text, json.loads(text))
        if fixups:
            for path, value in json.loads(fixups):
                cur = body
                for part in path[:-1]:
                    cur = cur[part]
                cur[path[-1]] = value
        return body

    def _dump_value(self, value: Any, fixups: list, path: list) -> str:
        if isinstance(value, dict):
            return (
                "{"
                + ",".join(
                    json.dumps(self.key(k), ensure_ascii=False) + ":" + self._dump_value(v, fixups, path + [k])
                    for k, v in value.items()
                )
                + "}"
            )
        if isinstance(value, list):
            return "[" + ",".join(self._dump_value(v, fixups, path + [i]) for i, v in enumerate(value)) + "]"
        if isinstance(value, float):
            return self.number(value, path, fixups)
        if isinstance(value, str):
            value = self.stored(value)
        return json.dumps(value, ensure_ascii=False)
