"""Atomic file writes: write to a temporary name beside the target, then rename.

A killed process can leave a temporary file behind (`.NAME.XXXX.tmp`); it never has the target's
name, and `remove_stale_temporaries` clears such files from a directory the caller owns.
Written files get the mode the umask gives a new file (mkstemp alone would make them 0600).
"""
import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import shutil
import stat
import tempfile

from utils.errors import UserError

TMP_SUFFIX = ".tmp"


class FileKindError(UserError):
    """A path where a regular file should be that is missing or something else."""


def check_file(path, what):
    """Raise FileKindError unless `path` is a readable regular file (symbolic links followed).
    The message says what is there instead: nothing, a directory, a FIFO, a broken link or a
    link loop, so that nothing blocks on a FIFO or reports a directory as "not found"."""
    if not path:
        raise FileKindError(f"no {what} file is configured")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileKindError(f"{what} file {path} is a symbolic link to a missing file") \
                from None
        raise FileKindError(f"{what} file not found: {path}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FileKindError(f"{what} file {path} is a symbolic link loop") from None
        raise FileKindError(f"{what} file {path} cannot be read: {err.strerror}") from None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    for test, kind in kinds:
        if test(mode):
            raise FileKindError(f"{what} file {path} is {kind}, not a regular file")
    if not os.access(path, os.R_OK):
        raise FileKindError(f"{what} file {path} cannot be read: permission denied")
    return path


def file_identity(path):
    """(size, mtime_ns, inode, device) of a file: what changes when its content may have."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM,
                errno.ENOTDIR, errno.EEXIST)


def write_error(path, err):
    """A UserError for an OSError of a write that the user can fix (space, permissions)."""
    reason = err.strerror or str(err)
    if "No space left" in str(err):     # h5py reports a full disk without an errno
        reason = os.strerror(errno.ENOSPC)
    return UserError(f"cannot write {path}: {reason}")


def _is_write_error(err):
    return err.errno in WRITE_ERRNOS or "No space left" in str(err)


def writable_dir(path, what, create=True):
    """Check that files can be made in the directory `path` by making (and removing) one, so a
    read-only or impossible location stops with a UserError before any work is done. With
    `create` the directory is made if missing; without, nothing is left behind: the check probes
    the nearest existing folder on the way to `path`."""
    try:
        if create:
            os.makedirs(path, exist_ok=True)
            probe_dir = path
        else:
            probe_dir = os.path.abspath(path)
            while not os.path.exists(probe_dir):
                probe_dir = os.path.dirname(probe_dir)
            if not os.path.isdir(probe_dir):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        handle, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TMP_SUFFIX, dir=probe_dir)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise UserError(f"the {what} {path} is not writable: {err.strerror or err}") from None


def check_new_output(path, what, inputs=(), replace=False):
    """Stop with one line unless a command may write its output file `path`: not a directory,
    not one of the command's `inputs` under any name, not an existing file unless `replace`
    (never a user's file lost to a mistyped name), in a writable folder (made if missing)."""
    if os.path.isdir(path):
        raise FileKindError(f"{what} {path} is a directory; give a file name")
    if os.path.lexists(path):
        for source in inputs:
            if source and os.path.exists(source) and os.path.exists(path) and \
                    os.path.samefile(path, source):
                raise UserError(f"{what} {path} is the input {source}; give another name")
        if not replace:
            raise UserError(f"{what} {path} exists; give another name, or --replace to "
                            f"overwrite it")
    writable_dir(os.path.dirname(os.path.abspath(path)), f"folder of the {what}")
    return path


@contextlib.contextmanager
def dir_lock(path, what, wait=False):
    """Hold an exclusive lock on the directory `path` while the context is open (on the
    directory itself, so clearing its contents keeps the lock). Without `wait`, a directory
    another process holds is a UserError."""
    handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UserError(f"the {what} {path} is in use by another process") from None
        yield
    finally:
        os.close(handle)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it to `path`, else delete it.
    A full disk or a read-only directory is a UserError naming `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        os.makedirs(directory, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=TMP_SUFFIX, dir=directory)
    except OSError as err:
        raise write_error(path, err) from None
    os.close(handle)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        if _is_write_error(err):
            raise write_error(path, err) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(directory, names=None):
    """Delete the temporaries killed writes left in `directory` (only those of files named in
    `names`, when given); returns their names. Call it only while owning the directory."""
    stale = sorted(glob.glob(os.path.join(glob.escape(directory), f".*{TMP_SUFFIX}")))
    if names is not None:
        stale = [p for p in stale if any(os.path.basename(p).startswith(f".{n}.") for n in names)]
    for path in stale:
        os.remove(path)
    return [os.path.basename(p) for p in stale]


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


# Room left free beyond a file's own size when checking space before a write.
SPACE_MARGIN = 1 << 20


def ensure_space(path, nbytes):
    """Before writing `nbytes` to `path`: a UserError naming the file when its file system has no
    room for them (where that can be known)."""
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    free = shutil.disk_usage(directory).free
    if free < nbytes + SPACE_MARGIN:
        raise UserError(f"cannot write {path}: {os.strerror(errno.ENOSPC)} (it needs "
                        f"{size_text(nbytes)}, and {size_text(SPACE_MARGIN)} to spare; "
                        f"{size_text(free)} are free)")


def size_text(nbytes):
    """A byte count for a message: MiB, or KiB below a tenth of one."""
    if nbytes < 2 ** 20 / 10:
        return f"{nbytes / 2 ** 10:,.1f} KiB"
    return f"{nbytes / 2 ** 20:,.1f} MiB"


def write_bytes(path, data):
    ensure_space(path, len(data))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def append_line(path, text):
    """Append one line (a log record); a full disk is a UserError."""
    try:
        with open(path, "a") as f:
            f.write(text + "\n")
    except OSError as err:
        if _is_write_error(err):
            raise write_error(path, err) from None
        raise


def _strict(value):
    """JSON-ready copy: dict keys as strings, numpy scalars as Python numbers, non-finite floats
    as None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(payload, indent=2):
    """Strict JSON text of `payload` (see `_strict`)."""
    return json.dumps(_strict(payload), indent=indent, allow_nan=False)


def write_json(path, payload):
    """Strict JSON, written atomically."""
    atomic_write_text(path, json_text(payload) + "\n")


def read_json(path, what):
    """Parse a JSON file this project wrote; a missing or broken file is a UserError."""
    check_file(path, what)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable {what} ({err})") from None
