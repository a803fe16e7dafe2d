"""Structure checks for the files this project reads back (records, results, log lines,
checkpoints, indexes): a damaged or foreign file is one UserError naming the file and the part
that is wrong, never an AttributeError or KeyError further on.

A spec is a type or tuple of types (`int` admits no bool), a dict {key: spec} of required keys
(other keys are allowed), or a one-element list [spec] for a list of such items.
"""
from utils.errors import UserError


class StructureError(UserError):
    """A file of one of the project's own kinds whose contents do not have the expected shape."""


def _type_name(spec):
    if isinstance(spec, tuple):
        return " or ".join(_type_name(s) for s in spec)
    if isinstance(spec, dict):
        return "an object"
    if isinstance(spec, list):
        return "a list"
    return {type(None): "null"}.get(spec, spec.__name__)


def _is(value, kind):
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_structure(value, spec, where, at=""):
    """Raise StructureError (naming `where`, the file, and the dotted place `at`) unless `value`
    matches `spec`; returns `value`."""
    name = f"'{at}'" if at else "its contents"
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise StructureError(f"{where}: {name} must be an object, got "
                                 f"{type(value).__name__}")
        for key, sub in spec.items():
            if key not in value:
                raise StructureError(f"{where}: '{at + '.' if at else ''}{key}' is missing")
            check_structure(value[key], sub, where, f"{at + '.' if at else ''}{key}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise StructureError(f"{where}: {name} must be a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            check_structure(item, spec[0], where, f"{at}[{i}]")
    else:
        kinds = spec if isinstance(spec, tuple) else (spec,)
        if not any(_is(value, kind) for kind in kinds):
            raise StructureError(f"{where}: {name} must be {_type_name(spec)}, got "
                                 f"{type(value).__name__}")
    return value
