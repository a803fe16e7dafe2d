"""Config files: `_base_` inheritance, dotted `--cfg-options` overrides, one validation pass,
derived paths, and resolved configs saved as data.

A config file a user writes is plain Python; its public module-level names are the keys. `_base_`
(a path or a list of paths, relative to the file) names the files it inherits from. A child may
only change keys its bases define, and only to a value of the same type (an int where a float is
expected, a list where a tuple is expected, and anything where the base holds None are accepted).
Every value is then checked against `RULES` (range, allowed values, cross-key constraints) before
anything else happens. The resolved config is frozen: reading an unknown key or assigning any
key raises. What a run saves is JSON (`save_config`), read back by `load_saved_config` without
executing anything.
"""
import ast
import hashlib
import json
import math
import os
import pprint
import runpy
import string

import addict

from utils.errors import UserError
from utils.fileio import check_file, read_json, write_json

BASE_KEY = "_base_"
# Keys computed from the others by `derive_paths`; never set by a config file.
DERIVED_KEY = "paths"
BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "_base_", "s5vh.py")


class ConfigError(UserError):
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


def _short(value, limit=80):
    """repr of a value for a message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_file(path):
    try:
        check_file(path, "config")
    except UserError as err:
        raise ConfigError(str(err)) from None
    try:
        namespace = runpy.run_path(path)
    except Exception as err:  # any error in a user's Python file is a config error
        where = f" (line {err.lineno})" if isinstance(err, SyntaxError) else ""
        raise ConfigError(f"{path}{where}: the config file does not run: "
                          f"{type(err).__name__}: {err}") from None
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
                              f"got {type(value).__name__} {_short(value)}")
        if isinstance(base[key], tuple) and isinstance(value, list):
            value = tuple(value)           # a list read back from JSON where the base has a tuple
        merged[key] = _plain(value)
    return merged


def load_file(path, chain=()):
    """Read a config file and its bases into a plain dict (not yet resolved). `chain`: the files
    that inherit this one, so that a `_base_` loop stops with one line."""
    if os.path.realpath(path) in chain:
        raise ConfigError(f"{path}: its _base_ chain comes back to itself")
    keys = _read_file(path)
    bases = keys.pop(BASE_KEY, [])
    if DERIVED_KEY in keys:
        raise ConfigError(f"'{DERIVED_KEY}' in {path} is derived from the other keys; "
                          f"set data_root/dataset/nbits instead")
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, (list, tuple)):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {_short(bases)}")
    if not bases:
        return _plain(keys)
    merged = {}
    for base in bases:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got "
                              f"{_short(bases)}")
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        merged.update(load_file(base_path, chain + (os.path.realpath(path),)))
    return _merge(merged, keys, path)


def parse_overrides(items):
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are Python literals, else strings."""
    nested = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--cfg-options expects key=value, got {_short(item)}")
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
    artifact_dir = cfg["preprocess"]["artifact_dir"] or feature_dir
    data = cfg["data"]

    def in_dir(name):
        return os.path.join(feature_dir, name) if name else ""

    artifacts = {key: os.path.join(artifact_dir, name.format(nbits=cfg["nbits"]))
                 for key, name in cfg["preprocess"]["artifacts"].items()}
    run_name = f"{cfg['dataset']}_{cfg['nbits']}bits"
    return dict(
        feature_dir=feature_dir,
        artifact_dir=artifact_dir,
        train_feats=in_dir(data["train_feats"]),
        train_labels=in_dir(data["train_labels"]),
        db_feats=in_dir(data["db_feats"]),
        db_labels=in_dir(data["db_labels"]),
        query_feats=in_dir(data["query_feats"]),
        query_labels=in_dir(data["query_labels"]),
        run_dir=os.path.join(cfg["work_dir"], run_name),
        **artifacts,
    )


def _resolve(raw):
    check_config(raw)
    raw[DERIVED_KEY] = derive_paths(raw)
    _check_no_overwrite(raw[DERIVED_KEY], raw["preprocess"]["artifacts"])
    cfg = ConfigDict(raw)
    cfg.freeze()
    return cfg


def build_config(path, overrides=None):
    """Load `path`, apply `--cfg-options` items, check every value, derive paths and freeze."""
    raw = load_file(path)
    missing = _missing_keys(load_file(BASE_CONFIG), raw)
    if missing:
        raise ConfigError(f"{path} does not set {', '.join(missing[:4])}"
                          f"{' and more' if len(missing) > 4 else ''}: a config inherits the "
                          f"base config (_base_ = a relative path to configs/_base_/s5vh.py)")
    raw = _merge(raw, parse_overrides(overrides), "--cfg-options")
    return _resolve(raw)


def plain_config(cfg):
    """The config's keys as plain data, without the derived paths."""
    plain = _plain(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    plain.pop(DERIVED_KEY, None)
    return plain


# Keys that cannot change what a run computes: where it writes, how often it logs and saves, and
# how evaluation is batched. Everything else is the run's identity: its fingerprint, what a
# resume must keep, and what `tools.paper` matches to reuse a finished run.
NON_RESULT_KEYS = ("work_dir", "train.log_every", "train.checkpoint_every",
                   "train.checkpoint_seconds", "train.process_timeout", "eval.batch_size",
                   "eval.query_chunk", "preprocess.chunk_videos", "model.two_streams")


def result_keys(plain):
    """The result-relevant part of a plain config dict (NON_RESULT_KEYS left out)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in plain.items()}
    for dotted in NON_RESULT_KEYS:
        node, *rest = dotted.split(".")
        if rest and isinstance(out.get(node), dict):
            out[node].pop(rest[0], None)
        elif not rest:
            out.pop(node, None)
    return out


def config_fingerprint(cfg):
    """sha256 of a config's result-relevant keys (a resolved config or the plain dict a run saved;
    derived paths left out: they follow from the keys)."""
    plain = cfg if isinstance(cfg, dict) and not isinstance(cfg, ConfigDict) else plain_config(cfg)
    text = json.dumps(result_keys(plain), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def config_text(cfg):
    """The resolved config as Python-like text, for people to read (derived paths as comments)."""
    plain = _plain(cfg.to_dict())
    paths = plain.pop(DERIVED_KEY, {})
    lines = ["# Resolved config (all bases and overrides applied).", ""]
    for key, value in plain.items():
        lines.append(f"{key} = {pprint.pformat(value, sort_dicts=False, width=96)}")
    lines += ["", "# Derived paths:"]
    lines += [f"#   {key}: {value}" for key, value in paths.items()]
    return "\n".join(lines) + "\n"


def save_config(cfg, path, **extra):
    """Write the resolved config as JSON data: {'config': keys, 'fingerprint': ..., **extra}."""
    write_json(path, {"config": plain_config(cfg), "fingerprint": config_fingerprint(cfg),
                      **extra})


def _missing_keys(base, saved, prefix=""):
    """Dotted keys of `base` that `saved` lacks."""
    missing = []
    for key, value in base.items():
        if key not in saved:
            missing.append(prefix + key)
        elif isinstance(value, dict) and isinstance(saved[key], dict):
            missing += _missing_keys(value, saved[key], f"{prefix}{key}.")
    return missing


def load_saved_config(path, overrides=None):
    """(config, the saved record, keys the record predates) from a file `save_config` wrote,
    parsed as data (nothing is executed).

    The record's fingerprint must be that of its keys as saved (so an edited file is refused);
    they are then checked like a config file against today's base config. Keys added to the base
    after the run was saved take their defaults, which reproduce the behaviour from before they
    existed; they are returned so the caller can say so."""
    record = read_json(path, "saved run config")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"{path}: not a saved run config (no 'config' object)")
    if record.get("fingerprint") != config_fingerprint(record["config"]):
        raise ConfigError(f"{path} was edited after the run wrote it (its fingerprint does not "
                          f"match its keys)")
    base = load_file(BASE_CONFIG)
    raw = _merge(base, record["config"], path)
    raw = _merge(raw, parse_overrides(overrides), "--cfg-options")
    return _resolve(raw), record, _missing_keys(base, record["config"])


def check_distinct(values, option):
    """A command-line list without repeats (each item would run twice, or overwrite itself)."""
    seen, repeated = set(), []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    if repeated:
        raise ConfigError(f"{option} lists {', '.join(map(str, repeated))} more than once")


def check_code_lengths(bits, option="--bits"):
    """Code lengths given on a command line: distinct, each in 1..MAX_BITS."""
    check_distinct(bits, option)
    for nbits in bits:
        if not 1 <= nbits <= MAX_BITS:
            raise ConfigError(f"{option} must be between 1 and {MAX_BITS}, got {nbits}")


def same_experiment(a, b):
    """True when two resolved configs compute the same thing (equal result-relevant keys)."""
    return config_fingerprint(a) == config_fingerprint(b)


# ---- one validation pass over every key ----------------------------------------------------

# Allowed values of the keys that name a choice. The modules that implement a choice keep their
# own tables; tests check that they agree with these.
CHOICES = {
    "data.protocol": ("train_as_database", "separate", "all_vs_all", "holdout"),
    "preprocess.center_init": ("hadamard", "random"),
    "model.variant": ("mini", "small", "base"),
    "model.mixer": ("mamba", "lstm", "attention", "retention", "rwkv"),
    "model.mamba_impl": ("auto", "plain", "triton", "cuda"),
    "model.attention_impl": ("sdpa", "explicit"),
    "model.decoder_order": ("visible_first", "time"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.resident_dtype": ("float32", "bfloat16", "float16"),
    "train.select": ("last", "val", "test"),
    "train.monitor": ("none", "val", "test"),
    "train.negatives": ("all", "other_clusters"),
}

# Longest code any command accepts (hash centers need a B x B solve per center).
MAX_BITS = 4096

# (low, high, low inclusive, high inclusive) for numeric keys; None: unbounded on that side.
RANGES = {
    "seed": (0, None, True, None), "nbits": (1, MAX_BITS, True, True),
    "feature_size": (1, None, True, None), "max_frames": (2, None, True, None),
    "data.holdout_queries": (0, 1, False, False), "data.holdout_seed": (0, None, True, None),
    "preprocess.latent_dim_pca": (1, None, True, None), "preprocess.nclusters": (2, None, True, None),
    "preprocess.kmeans_n_init": (1, None, True, None),
    "preprocess.nearest_clusters": (1, None, True, None),
    "preprocess.center_alpha": (0, None, True, None), "preprocess.center_rho": (0, None, False, None),
    "preprocess.center_rho_growth": (1, None, True, None),
    "preprocess.center_rho_max": (0, None, False, None),
    "preprocess.center_max_iter": (1, None, True, None),
    "preprocess.center_sweeps": (0, None, True, None),
    "preprocess.chunk_videos": (1, None, True, None),
    "model.hidden_size": (1, None, True, None), "model.decoder_hidden_size": (1, None, True, None),
    "model.decoder_depth": (1, None, True, None), "model.drop_path": (0, 1, True, False),
    "model.d_state": (1, None, True, None), "model.d_conv": (1, None, True, None),
    "model.expand": (1, None, True, None), "model.num_heads": (1, None, True, None),
    "train.batch_size": (2, None, True, None), "train.num_epochs": (1, None, True, None),
    "train.mask_ratio": (0, 1, False, False), "train.lr": (0, None, False, None),
    "train.min_lr": (0, None, True, None), "train.weight_decay": (0, None, True, None),
    "train.alpha": (0, None, True, None), "train.a_rec": (0, None, True, None), "train.tau_plus": (0, 1, True, False),
    "train.temperature": (0, None, False, None), "train.a_cluster": (0, None, True, None),
    "train.temperature_cluster": (0, None, False, None),
    "train.warm_up_epoch": (0, None, True, None), "train.smoothing_beta": (0, 1, True, True),
    "train.eval_every": (1, None, True, None), "train.checkpoint_every": (0, None, True, None),
    "train.checkpoint_seconds": (0, None, True, None),
    "train.process_timeout": (1, None, True, None),
    "train.val_fraction": (0, 1, False, False), "train.log_every": (1, None, True, None),
    "eval.batch_size": (1, None, True, None), "eval.query_chunk": (1, None, True, None),
}

NON_EMPTY = ("dataset", "data_root", "work_dir", "data.feature_key", "data.train_feats")
# files each protocol needs besides the training features
PROTOCOL_FILES = {"train_as_database": ("train_labels", "query_feats", "query_labels"),
                  "separate": ("db_feats", "db_labels", "query_feats", "query_labels"),
                  "all_vs_all": ("db_feats", "db_labels"),
                  "holdout": ("train_labels",)}


def _get(raw, dotted):
    node = raw
    for part in dotted.split("."):
        node = node[part]
    return node


def _describe_range(low, high, low_in, high_in):
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_in else '>'} {low}")
    if high is not None:
        parts.append(f"{'<=' if high_in else '<'} {high}")
    return " and ".join(parts)


def _check_number(key, value, low, high, low_in, high_in):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {_short(value)}")
    too_low = low is not None and (value < low if low_in else value <= low)
    too_high = high is not None and (value > high if high_in else value >= high)
    if too_low or too_high:
        raise ConfigError(f"config key '{key}' must be {_describe_range(low, high, low_in, high_in)}"
                          f", got {value!r}")


DATA_FILE_KEYS = ("train_feats", "train_labels", "db_feats", "db_labels", "query_feats",
                  "query_labels")


def _check_file_name(key, name, fields=()):
    """A plain file name (no folder, no '..', not hidden); `{field}` only for the given fields."""
    if not isinstance(name, str):
        raise ConfigError(f"config key '{key}' must be a file name, got {_short(name)}")
    if name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or \
            "\0" in name:
        raise ConfigError(f"config key '{key}' must be a plain file name (no folder, no '..', "
                          f"not starting with '.'), got {_short(name)}")
    try:
        used = [(field, spec, conv) for _, field, spec, conv in string.Formatter().parse(name)
                if field is not None]
    except ValueError as err:
        raise ConfigError(f"config key '{key}' is not a valid file-name pattern ({err}): "
                          f"{name!r}") from None
    for field, spec, conv in used:
        if field not in fields or spec or conv:
            allowed = ", ".join(f"{{{f}}}" for f in fields) or "no {...} fields"
            raise ConfigError(f"config key '{key}' may only use {allowed}, got {_short(name)}")


def _check_file_names(raw):
    """Every configured file name is a plain name in its folder."""
    data, artifacts = raw["data"], raw["preprocess"]["artifacts"]
    for key in DATA_FILE_KEYS:
        if data[key]:
            _check_file_name(f"data.{key}", data[key])
    for key, name in artifacts.items():
        _check_file_name(f"preprocess.artifacts.{key}", name, fields=("nbits",))


def _check_no_overwrite(paths, artifact_names):
    """No artifact may be written over an input file or over another artifact."""
    inputs = {os.path.realpath(paths[key]): f"data.{key}" for key in DATA_FILE_KEYS if paths[key]}
    made = {}
    for key in artifact_names:
        where = os.path.realpath(paths[key])
        if where in inputs:
            raise ConfigError(f"config key 'preprocess.artifacts.{key}' names {paths[key]}, the "
                              f"input file of '{inputs[where]}'; preprocessing would overwrite it")
        if where in made:
            raise ConfigError(f"config keys 'preprocess.artifacts.{made[where]}' and "
                              f"'preprocess.artifacts.{key}' name the same file {paths[key]}")
        made[where] = key


def check_config(raw):
    """Check every key's value (types were checked against the base when merging); the first
    problem raises ConfigError naming the key and what it must be."""
    for key, allowed in CHOICES.items():
        value = _get(raw, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got "
                              f"{_short(value)}")
    for key, bounds in RANGES.items():
        _check_number(key, _get(raw, key), *bounds)
    for key in NON_EMPTY:
        if not isinstance(_get(raw, key), str) or not _get(raw, key).strip():
            raise ConfigError(f"config key '{key}' must be a non-empty string")
    _check_file_names(raw)
    data = raw["data"]
    for name in PROTOCOL_FILES[data["protocol"]]:
        if not data[name]:
            raise ConfigError(f"config key 'data.{name}' is empty, but data.protocol="
                              f"'{data['protocol']}' needs it")
    p, m, t = raw["preprocess"], raw["model"], raw["train"]
    nbits = raw["nbits"]
    if p["center_init"] == "hadamard" and nbits & (nbits - 1):
        raise ConfigError(f"config key 'nbits' must be a power of two for "
                          f"preprocess.center_init='hadamard', got {nbits} (use 'random')")
    if p["nearest_clusters"] > p["nclusters"]:
        raise ConfigError(f"config key 'preprocess.nearest_clusters' must be at most "
                          f"preprocess.nclusters ({p['nclusters']}), got {p['nearest_clusters']}")
    if p["center_rho_max"] < p["center_rho"]:
        raise ConfigError("config key 'preprocess.center_rho_max' must be at least "
                          f"preprocess.center_rho ({p['center_rho']}), got {p['center_rho_max']}")
    frames, ratio = raw["max_frames"], t["mask_ratio"]
    visible = frames - math.floor(ratio * frames)
    if not 1 <= visible <= frames - 1:
        raise ConfigError(f"config key 'train.mask_ratio' must leave at least one visible and one "
                          f"masked frame of max_frames={frames}; {ratio} leaves {visible} visible")
    if m["mixer"] in ("attention", "retention"):
        for width in ("hidden_size", "decoder_hidden_size"):
            if m[width] % m["num_heads"]:
                raise ConfigError(f"config key 'model.num_heads' ({m['num_heads']}) must divide "
                                  f"model.{width} ({m[width]}) for model.mixer='{m['mixer']}'")
    betas = t["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"config key 'train.betas' must be two numbers in [0, 1), got {_short(betas)}")
    if t["min_lr"] > t["lr"]:
        raise ConfigError(f"config key 'train.min_lr' must be at most train.lr ({t['lr']}), "
                          f"got {t['min_lr']}")
    topk = raw["eval"]["topk"]
    if not topk or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                           for k in topk):
        raise ConfigError(f"config key 'eval.topk' must be a non-empty list of integers >= 1, "
                          f"got {_short(topk)}")
    if 5 not in topk and t["select"] != "last":
        raise ConfigError(f"config key 'eval.topk' must contain 5 when train.select="
                          f"'{t['select']}' (selection is by mAP@5), got {_short(list(topk))}")
