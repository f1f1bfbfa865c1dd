"""Writing files so that nothing is ever seen half-written, and telling when a file has changed.

A file is written under a temporary name and renamed into place (a rename is atomic), a folder is locked with
flock on the folder itself (so no lock file is left behind), and a file's stamp changes whenever it is rewritten.
"""
import contextlib
import fcntl
import os


def write_text_atomically(path, text):
    """Write text to path by way of a temporary name: a concurrent reader never sees half a file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def files_stamp(file_paths):
    """Name, size, inode and mtime of each file: changes whenever a file is rewritten or replaced."""
    stamp = []
    for path in file_paths:
        stat = path.stat()
        stamp.append([path.name, stat.st_size, stat.st_ino, stat.st_mtime_ns])
    return stamp


@contextlib.contextmanager
def locked(folder):
    """An exclusive lock on the folder itself (flock works on a directory), so no lock file is left behind."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fsync(path):  # a file's or a folder's contents on disk, before a rename declares them complete
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
