"""What a session going on under a new config changes from the config its record ran with.

A record keeps the config its session ran with (``record["config"]``).  When a
session attaches to that record with a config of its own (``Session.resume``,
``Session.from_config(..., session_id=...)``, or ``config=``), :func:`plan`
compares the two, field by dotted path:

* where and how often the session records (``name``, ``db``, ``checkpoint``,
  ``status_interval``, ``metadata``) is not compared: the new values are used;
* a learning rate (``model.optimizer.lr``, unless a scheduler sets it),
  ``model.grad_clip`` and a stage's budget (``stages[i].max_epochs``,
  ``max_steps``) can be applied to a run in progress when asked for
  (``overrides=`` naming them): the budget at once, as the stages are built from
  the new config; the lr and the clipping after the checkpoint is restored (by
  :meth:`ConfigChanges.apply`), because the restore puts the old values back;
* anything else changes what the run computes (module, criterion, optimizer,
  scheduler, metrics, data, seed, stages, transitions, updates) and is refused
  with a :class:`~ptutils.errors.ConfigChangeError` listing every such field.

A pending record has computed nothing yet, so it takes any change.  Each change
taken is recorded: the record's ``config`` becomes the new one and its
``config_changes`` list gets an entry with the step it took effect at and each
field's old and new value (:meth:`ConfigChanges.entry`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .config import Config
from .errors import ConfigChangeError, ConfigError
from .model import Model

NOT_COMPARED = ("name", "db", "checkpoint", "status_interval", "metadata")
"""Fields that say where and how often a session records, not what it computes."""
APPLICABLE = re.compile(r"model\.optimizer\.lr|model\.grad_clip|stages\[\d+\]\.(max_epochs|max_steps)")
"""Fields a run in progress can take when asked; every other difference is refused."""


def differences(old: Any, new: Any, path: str = "") -> dict[str, tuple[Any, Any]]:
    """Each dotted path where two config dicts differ, with ``(old, new)``; lists of equal length item by item.

    A field one side lacks and the other leaves empty (a record written before
    the field existed) is no difference.
    """
    if old in (None, {}, []) and new in (None, {}, []):
        return {}
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        if _described(old) and _described(new):
            return {} if _same_object(old, new) else {path: (old, new)}
        found: dict[str, tuple[Any, Any]] = {}
        for key in list(old) + [k for k in new if k not in old]:
            found.update(differences(old.get(key), new.get(key), f"{path}.{key}" if path else key))
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        found = {}
        for i, (a, b) in enumerate(zip(old, new)):
            found.update(differences(a, b, f"{path}[{i}]"))
        return found
    return {} if old == new else {path: (old, new)}


def _described(value: Mapping) -> bool:
    """Whether a config dict entry describes a Python object (``to_dict`` records its type and repr)."""
    return set(value) == {"object", "repr"}


def _same_object(a: Mapping, b: Mapping) -> bool:
    """Same type, and the same repr unless one holds a memory address (which differs in every process)."""
    if a["object"] != b["object"]:
        return False
    return "0x" in a["repr"] or "0x" in b["repr"] or a["repr"] == b["repr"]


def _asked(path: str, asked: Iterable[str]) -> bool:
    return any(path == key or path.startswith((key + ".", key + "[")) for key in asked)


def _why_refused(path: str, new: Mapping[str, Any]) -> str | None:
    """Why a field cannot be applied to a run in progress, or None when it can."""
    if not APPLICABLE.fullmatch(path):
        return "changes what the run computes; start a new session for it"
    if path == "model.optimizer.lr" and (new.get("model") or {}).get("scheduler") is not None:
        return "the scheduler sets the lr (its state is in the checkpoint); start a new session for it"
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@attrs.define
class ConfigChanges:
    """The changes a session takes from its new config: each field's (old, new), and the new config's dict."""

    fields: dict[str, tuple[Any, Any]]
    config: dict[str, Any]

    def apply(self, model: Model) -> None:
        """Set what a checkpoint restore put back (the lr, the clipping) to the new values."""
        apply_values(model, {path: new for path, (_, new) in self.fields.items()})

    def entry(self, *, attempt: int, stage: str, step: int) -> dict[str, Any]:
        """The record's ``config_changes`` entry: when the changes took effect, and each field's values."""
        return {
            "attempt": attempt, "stage": stage, "step": step, "time": time.time(),
            "fields": [{"field": path, "from": old, "to": new} for path, (old, new) in self.fields.items()],
        }


def apply_values(model: Model, values: Mapping[str, Any] | None) -> None:
    """Set hyperparameters a checkpoint's load put back: ``model.optimizer.<key>`` in every param group, the clipping.

    Other paths take effect where the session is built from its config (a
    module's keyword, a stage's budget), so they need nothing here.  A key the
    optimizer's param groups lack raises ConfigError naming the path.
    """
    for path, value in (values or {}).items():
        if path == "model.grad_clip":
            model.grad_clip = value
        elif path.startswith("model.optimizer."):
            key = path.removeprefix("model.optimizer.")
            groups = model.optimizer.param_groups
            if any(key not in group for group in groups):
                raise ConfigError(path, f"the optimizer {type(model.optimizer).__name__} has no {key!r} in its "
                                        f"param groups (it has {', '.join(sorted(groups[0]))})")
            for group in groups:
                group[key] = value


def plan(session_id: str, recorded: Mapping[str, Any] | None, config: Config | None, asked: Iterable[str],
         state: str) -> ConfigChanges | None:
    """The changes a session attaching to its record with ``config`` takes (None when there are none).

    ``asked`` are the dotted paths the caller changed on purpose (``overrides=``).
    Raises ConfigChangeError listing every difference that is refused.
    """
    if recorded is None or config is None:
        return None
    new = config.to_dict()
    found = {path: values for path, values in differences(dict(recorded), new).items()
             if path.split(".", 1)[0].split("[", 1)[0] not in NOT_COMPARED}
    if not found:
        return ConfigChanges({}, new) if new != recorded else None
    if state != "pending":
        asked = list(asked)
        refused = {}
        for path, (old, value) in found.items():
            why = _why_refused(path, new)
            if why is None and not _asked(path, asked):
                why = f"can be applied: pass overrides={{{path!r}: {value!r}}}"
            if why is not None:
                refused[path] = f"  {path}: {_show(old)} -> {_show(value)} ({why})"
        if refused:
            raise ConfigChangeError(
                session_id, {path: found[path] for path in refused},
                f"session {session_id!r} ran with another config; it is {state} and was not changed:\n"
                + "\n".join(refused.values()),
            )
    return ConfigChanges(found, new)
