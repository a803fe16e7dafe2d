"""Python config files: `_base_` inheritance, dotted `--cfg-options` overrides, derived paths.

A config file is plain Python; its public module-level names are the keys. `_base_` (a path or a
list of paths, relative to the file) names the files it inherits from. A child may only change keys
its bases define, and only to a value of the same type (an int where a float is expected, a list
where a tuple is expected, and anything where the base holds None are accepted). The resolved
config is frozen: reading an unknown key or assigning any key raises.
"""
import ast
import os
import pprint
import runpy

import addict

from utils.fileio import atomic_write_text

BASE_KEY = "_base_"
# Keys computed from the others by `derive_paths`; never set by a config file.
DERIVED_KEY = "paths"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class ConfigDict(addict.Dict):
    """addict.Dict whose `freeze()` forbids every assignment, not only new keys."""

    def __setitem__(self, name, value):
        if self._is_frozen():
            raise ConfigError(f"config is frozen; cannot set '{name}'")
        super().__setitem__(name, value)

    def __delitem__(self, name):
        if self._is_frozen():
            raise ConfigError(f"config is frozen; cannot delete '{name}'")
        super().__delitem__(name)

    def __missing__(self, name):
        if self._is_frozen():
            raise KeyError(f"unknown config key '{name}'")
        return super().__missing__(name)

    def _is_frozen(self):
        try:
            return object.__getattribute__(self, "__frozen")
        except AttributeError:
            return False


def _plain(value):
    """Config values as plain dicts/lists (for merging, printing and dumping)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _read_file(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    namespace = runpy.run_path(path)
    keys = {k: v for k, v in namespace.items()
            if not k.startswith("__") and not callable(v) and not isinstance(v, type(os))}
    return keys


def _compatible(base_value, new_value):
    if base_value is None or new_value is None:
        return True
    if isinstance(base_value, bool) or isinstance(new_value, bool):
        return isinstance(base_value, bool) and isinstance(new_value, bool)
    if isinstance(base_value, float) and isinstance(new_value, int):
        return True
    if isinstance(base_value, (list, tuple)) and isinstance(new_value, (list, tuple)):
        return True
    return type(base_value) is type(new_value)


def _merge(base, child, where, prefix=""):
    """Return base updated by child; unknown keys and type changes are errors naming the key."""
    merged = dict(base)
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{dotted}' in {where}; "
                              f"known keys here: {sorted(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            merged[key] = _merge(base[key], value, where, dotted + ".")
            continue
        if not _compatible(base[key], value):
            raise ConfigError(f"config key '{dotted}' in {where} must be "
                              f"{type(base[key]).__name__} (base value {base[key]!r}), "
                              f"got {type(value).__name__} {value!r}")
        merged[key] = _plain(value)
    return merged


def load_file(path):
    """Read a config file and its bases into a plain dict (not yet resolved)."""
    keys = _read_file(path)
    bases = keys.pop(BASE_KEY, [])
    if DERIVED_KEY in keys:
        raise ConfigError(f"'{DERIVED_KEY}' in {path} is derived from the other keys; "
                          f"set data_root/dataset/nbits instead")
    if isinstance(bases, str):
        bases = [bases]
    if not bases:
        return _plain(keys)
    merged = {}
    for base in bases:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        merged.update(load_file(base_path))
    return _merge(merged, keys, path)


def parse_overrides(items):
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are Python literals, else strings."""
    nested = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--cfg-options expects key=value, got '{item}'")
        key, text = item.split("=", 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--cfg-options sets both '{part}' and keys below it")
        node[parts[-1]] = value
    return nested


def derive_paths(cfg):
    """Every file location, from data_root, dataset, nbits and the file names in `data`."""
    feature_dir = os.path.join(cfg["data_root"], cfg["dataset"])
    data = cfg["data"]

    def in_dir(name):
        return os.path.join(feature_dir, name) if name else ""

    artifacts = {key: in_dir(name.format(nbits=cfg["nbits"]))
                 for key, name in cfg["preprocess"]["artifacts"].items()}
    run_name = f"{cfg['dataset']}_{cfg['nbits']}bits"
    return dict(
        feature_dir=feature_dir,
        train_feats=in_dir(data["train_feats"]),
        train_labels=in_dir(data["train_labels"]),
        db_feats=in_dir(data["db_feats"]),
        db_labels=in_dir(data["db_labels"]),
        query_feats=in_dir(data["query_feats"]),
        query_labels=in_dir(data["query_labels"]),
        run_dir=os.path.join(cfg["work_dir"], run_name),
        **artifacts,
    )


def build_config(path, overrides=None):
    """Load `path`, apply `--cfg-options` items, derive paths and freeze."""
    raw = load_file(path)
    raw = _merge(raw, parse_overrides(overrides), "--cfg-options")
    raw[DERIVED_KEY] = derive_paths(raw)
    cfg = ConfigDict(raw)
    cfg.freeze()
    return cfg


def config_text(cfg):
    """The resolved config as a loadable Python file (derived paths as comments)."""
    plain = _plain(cfg.to_dict())
    paths = plain.pop(DERIVED_KEY, {})
    lines = ["# Resolved config (all bases and overrides applied).", ""]
    for key, value in plain.items():
        lines.append(f"{key} = {pprint.pformat(value, sort_dicts=False, width=96)}")
    lines += ["", "# Derived paths:"]
    lines += [f"#   {key}: {value}" for key, value in paths.items()]
    return "\n".join(lines) + "\n"


def dump_config(cfg, path):
    atomic_write_text(path, config_text(cfg))
