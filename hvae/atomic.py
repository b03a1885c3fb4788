"""Atomic file writes: a temporary file in the destination's folder, flushed to disk, renamed over
the destination, so a reader (or a crash) sees the old file or the new one, never half of one.
Temporary files left by a writer that was killed are removed by the next write to that path.
A symbolic link is written through (its target is replaced, atomically, the link stays); a
FIFO, device, socket or directory at the destination is refused, never replaced."""
import os
import stat
import tempfile


def _kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def destination(path, name=None):
    """The file that writing ``path`` replaces: ``path`` with symbolic links resolved.

    Raises
    ------
    TypeError
        ``path`` is not a str, bytes or os.PathLike.
    ValueError
        ``path`` is empty, or names something other than a regular file (a FIFO, a device, a
        socket, a directory), which is never replaced. ``name`` (an argument's name) leads the
        message when given.
    """
    lead = f"{name}: " if name else ""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"{lead}expected a file path (str or os.PathLike), got "
                        f"{type(path).__name__}") from None
    if not path:
        raise ValueError(f"{lead}expected a file path, got an empty string")
    target = os.path.realpath(path)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise ValueError(f"{lead}{path}: cannot be written ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{lead}{path} is {_kind(mode)}; expected a regular file (or a new "
                         f"name), it is not replaced")
    return target


def _remove_stale(folder, prefix):
    """Delete temporary files of earlier writers to the same path that were killed mid-write
    (their process is gone); a live writer's file is left alone."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path, write):
    """Write a file atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination: a regular file, a new name, or a symbolic link to one (written through).
    write : callable
        ``write(f)`` writes the content to the binary file object ``f``.
    """
    path = destination(path)
    folder = os.path.dirname(path)
    prefix = f".{os.path.basename(path)}.hvae-"
    _remove_stale(folder, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
