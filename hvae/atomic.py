"""Atomic file writes: a temporary file in the destination's folder, flushed to disk, renamed over
the destination, so a reader (or a crash) sees the old file or the new one, never half of one."""
import os
import tempfile


def atomic_write(path, write):
    """Write a file atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination.
    write : callable
        ``write(f)`` writes the content to the binary file object ``f``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".hvae-", suffix=".tmp", dir=folder)
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
