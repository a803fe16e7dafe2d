"""sha256 of whole files, cached by file identity.

Every input a run or an artifact set depends on is identified by the sha256 of all its bytes, so
any change to any video is seen. Reading an 18 GB feature file takes a while, so the digest is
kept in a per-user cache keyed by the file's real path and identity (size, mtime_ns, inode,
device): an unchanged file is not read again, and a file whose identity changed is always read
again. The cache also keeps facts derived from a file's content (`cached_fact`), such as "every
value of key 'feats' is finite", so the checks of unchanged inputs cost nothing.

The cache lives in $S5VH_CACHE_DIR, else $XDG_CACHE_HOME/s5vh, else ~/.cache/s5vh. Where it
cannot be written, digests are computed every time and nothing else changes.
"""
import contextlib
import fcntl
import hashlib
import json
import os

from utils.fileio import check_file, file_identity, write_json

BLOCK = 8 << 20
CACHE_FILE = "file_hashes.json"


def cache_dir():
    explicit = os.environ.get("S5VH_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "s5vh")


def sha256_of(path):
    """sha256 of the bytes of `path`, read in 8 MiB blocks (no cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked_cache():
    """The cache as a dict, read and written back under an exclusive lock; None when the cache
    folder cannot be used."""
    folder = cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        handle = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield None
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        path = os.path.join(folder, CACHE_FILE)
        try:
            with open(path) as f:
                cache = json.load(f)
            if not isinstance(cache, dict):
                cache = {}
        except (OSError, ValueError):
            cache = {}                     # missing or damaged: it is only a cache
        before = json.dumps(cache, sort_keys=True)
        yield cache
        if json.dumps(cache, sort_keys=True) != before:
            with contextlib.suppress(OSError, Exception):
                write_json(path, cache)
    finally:
        os.close(handle)


def _lookup(path, name):
    """(identity, the cached value of `name` for the file as it is now, or None)."""
    identity = file_identity(path)
    with _locked_cache() as cache:
        entry = (cache or {}).get(os.path.realpath(path))
        if isinstance(entry, dict) and entry.get("identity") == identity:
            return identity, entry.get("values", {}).get(name)
    return identity, None


def _store(path, identity, name, value):
    """Keep `value` under `name` for `path` if the file still has `identity` (it was not
    changed while the value was computed); entries of files that are gone are dropped."""
    if file_identity(path) != identity:
        return
    with _locked_cache() as cache:
        if cache is None:
            return
        for stale in [p for p in cache if not os.path.exists(p)]:
            del cache[stale]
        real = os.path.realpath(path)
        entry = cache.get(real)
        if not isinstance(entry, dict) or entry.get("identity") != identity:
            entry = cache[real] = {"identity": identity, "values": {}}
        entry.setdefault("values", {})[name] = value


def cached_fact(path, name, compute):
    """A JSON-able fact about the content of `path`, computed by `compute()` once per file
    identity and kept in the cache under `name` (a fact whose computation raises is not kept).
    Computed outside the cache's lock, so other processes are not held up meanwhile."""
    identity, value = _lookup(path, name)
    if value is None:
        value = compute()
        _store(path, identity, name, value)
    return value


def file_sha256(path, what="input"):
    """sha256 of the whole file `path` (a regular file), read only when its identity changed."""
    check_file(path, what)
    return cached_fact(path, "sha256", lambda: sha256_of(path))
