"""What ``train.py --config.FIELD=VALUE`` overrides can say beyond ml_collections' flags.

ml_collections parses each override with the field's type, so two things a
user needs cannot be said on the command line, and a third fails with a
traceback:

- ``--config.FIELD=None``: a typed placeholder (``model.num_classes``,
  ``sample.num_steps``, ``diffusion.min_snr_gamma``, ...) parses "None" as an
  int or float and fails; a string field would become the string "None".
- ``--config.diffusion.schedule_kwargs.KEY=VALUE``: the schedule's keyword
  arguments are an open dict whose keys depend on ``diffusion.schedule``, so
  the defaults declare none, and ml_collections refuses a field it cannot find.
- A misspelled field (``--config.model.chh=64``) raises a KeyError from deep
  inside the flags parser.

``split_late_overrides`` takes the first two out of the command line before
the flags are parsed and ``apply_late_overrides`` applies them to the parsed
config, in command-line order against the overrides ml_collections applied
(the last one for a field wins, as for any flag). ``unknown_field_message``
turns the third into one line naming the override.
"""
from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Sequence

import ml_collections

# Dict-valued fields whose keys the command line may add or drop (KEY=None
# drops KEY: the schedule's own default applies).
OPEN_FIELDS = ("diffusion.schedule_kwargs",)

_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(=(.*))?$", re.DOTALL)


class OverrideError(ValueError):
    """A ``--config.`` override that names no field, or a value that cannot be set."""


def _open_field_of(path: str) -> str | None:
    for open_field in OPEN_FIELDS:
        if path.startswith(open_field + "."):
            return open_field
    return None


def split_late_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Takes ``--config.FIELD=None`` and ``--config.<open field>.KEY=VALUE`` out of ``argv``.

    Either may be in absl's space form too (``--config.FIELD None``,
    ``--config.<open field>.KEY VALUE``).

    Args:
      argv: the command line, program name first (flagfiles already expanded).

    Returns:
      ``(argv without them, {field path: raw value string})``, the dict in the
      order to apply. An override that ml_collections will apply and that
      comes later on the line for the same field (or a section holding it)
      cancels the earlier late one, so that the last one still wins.
    """
    kept, late = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # what follows is not flags
            kept.extend(argv[i:])
            break
        match = _OVERRIDE.match(arg) if i > 0 else None
        i += 1
        if match is None:
            kept.append(arg)
            continue
        path, value = match.group(1), match.group(3)
        if value is None and i < len(argv) and (argv[i] == "None" or _open_field_of(path)):
            value = argv[i]  # the space form, "--config.FIELD None": its value is the next word
            i += 1
        if value is not None and (value == "None" or _open_field_of(path)):
            late.pop(path, None)  # re-inserted last: the order to apply
            late[path] = value
            continue
        kept.append(arg)
        for earlier in list(late):  # this override replaces the field, or the section holding it
            if earlier == path or earlier.startswith(path + "."):
                del late[earlier]
    return kept, late


def _literal(raw: str):
    """A Python literal (0.02, 1e-4, 3, True, "x"); any other text as the string itself."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _has_no(parent: str, name: str) -> str:
    return f"config.{parent} has no field {name!r}" if parent else f"the config has no field {name!r}"


def _no_field(override: str, parents: Sequence[str], name: str,
              section: ml_collections.ConfigDict) -> OverrideError:
    close = difflib.get_close_matches(name, [str(k) for k in section], n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return OverrideError(f"--config.{override}: {_has_no('.'.join(parents), name)}{hint}")


def apply_late_overrides(config: ml_collections.ConfigDict, late: dict[str, str]) -> None:
    """Applies what :func:`split_late_overrides` took out, in place, in its order.

    ``FIELD=None`` sets an existing field (not a section) to None, which the
    config validation then judges like any value; ``<open field>.KEY=VALUE``
    sets KEY to the Python literal VALUE (or the string), and ``KEY=None``
    removes KEY. Raises OverrideError naming the override for a field that
    does not exist.
    """
    for path, raw in late.items():
        open_field = _open_field_of(path)
        parents, key = (open_field.split(".") if open_field else path.split(".")[:-1]), path.split(".")[-1]
        if open_field and path.count(".") != open_field.count(".") + 1:
            raise OverrideError(f"--config.{path}: {open_field} takes KEY=VALUE, one level below it")
        section = config
        for depth, name in enumerate(parents):
            so_far = ".".join(parents[:depth + 1])
            if name not in section:
                raise _no_field(path, parents[:depth], name, section)
            section = section[name]
            if not isinstance(section, ml_collections.ConfigDict):
                raise OverrideError(f"--config.{path}: config.{so_far} is a value, not a section")
        if open_field:
            with section.unlocked():
                if key in section:  # replaced whatever its type (the schedule judges the value)
                    del section[key]
                if raw != "None":
                    section[key] = _literal(raw)
            continue
        if key not in section:
            raise _no_field(path, parents, key, section)
        if isinstance(section[key], ml_collections.ConfigDict):
            raise OverrideError(f"--config.{path}: config.{path} is a section; None sets a field")
        section[key] = None


def unknown_field_message(error: BaseException, argv: Sequence[str]) -> str | None:
    """One line for the KeyError/AttributeError ml_collections raises on a misspelled override.

    Names the override on the command line whose path holds the missing name,
    with ml_collections' "Did you mean" hint. None if ``error`` is not that.
    """
    key_error = error
    while key_error is not None and not isinstance(key_error, KeyError):
        key_error = key_error.__context__
    if key_error is None or not key_error.args or not isinstance(key_error.args[0], str):
        return None
    first, _, hint = key_error.args[0].partition("\n")
    name = first.strip("'\"")
    for arg in argv[1:]:
        match = _OVERRIDE.match(arg)
        names = match.group(1).split(".") if match else []
        if name in names:
            hint = f" ({hint.strip()})" if hint.strip() else ""
            parent = ".".join(names[:names.index(name)])
            return f"--config.{match.group(1)}: {_has_no(parent, name)}{hint}"
    return None
