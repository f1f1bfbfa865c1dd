"""Writing files so that nothing is ever seen half-written, and telling when a file has changed.

A file is written under a temporary name and renamed into place (a rename is atomic), a folder is locked with
flock on the folder itself (so no lock file is left behind), and a file's stamp changes whenever it is rewritten.
A disk (or quota) that fills up while a file is written is one GPT2Error that says which file, how much it needed
and how much is free, with the temporary removed (disk_space_for). A text file is read as UTF-8 a piece at a time
(read_utf8), for texts of any size.
"""
import codecs
import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
from pathlib import Path

from errors import GPT2Error

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def json_lines(data):  # the bytes of a JSON-lines file -> iterator of (line, its value), for each line that parses
    # Lines end at \n only: str.splitlines would also cut a value's U+2028, which JSON leaves unescaped. A line that
    # does not parse is skipped: one a kill cut short (inside a UTF-8 character too, a ValueError as well), or one
    # nested deeper than Python recurses, which no run writes
    for line in data.split(b"\n"):
        try:
            yield line, json.loads(line)
        except (ValueError, RecursionError):
            continue


def write_text_atomically(path, text):
    """Write text to path by way of a temporary name: a concurrent reader never sees half a file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}")
    data = text.encode("utf-8")
    with disk_space_for(path, len(data)):
        try:
            temporary.write_bytes(data)
            os.replace(temporary, path)
        except BaseException:
            discard(temporary)
            raise


@contextlib.contextmanager
def disk_space_for(path, n_bytes, temporary=None, up_to=False):
    """Around the writing of n_bytes to path: a full disk or quota becomes the GPT2Error that says which file, how
    much it needed and how much is free, once temporary (a partial file that would hold space) is removed.
    up_to: n_bytes is the most the file can take, not its size."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        if temporary is not None:
            discard(temporary)
        needed = f"{'up to ' if up_to else ''}{size_text(n_bytes)}" if n_bytes is not None else "more"
        raise GPT2Error(f"cannot write {path} ({e.strerror}): it needs {needed} and {size_text(free_bytes(path))} "
                        "is free there: free some space, then run again") from None


def free_bytes(path):  # the space free on the disk that holds path, or would hold it
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def size_text(n_bytes):  # 3.2 MiB
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n_bytes < 1024 or unit == "EiB":
            return f"{n_bytes} B" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


def discard(path):  # remove a temporary file if it is there; a removal that fails must not hide why it was needed
    with contextlib.suppress(OSError):
        os.remove(path)


def files_stamp(file_paths):
    """Name, size, inode and mtime of each file: changes whenever a file is rewritten or replaced."""
    stamp = []
    for path in file_paths:
        stat = path.stat()
        stamp.append([path.name, stat.st_size, stat.st_ino, stat.st_mtime_ns])
    return stamp


@contextlib.contextmanager
def locked(folder, wait=True):
    """An exclusive lock on the folder itself (flock works on a directory), so no lock file is left behind.
    wait=False: a lock another process holds raises BlockingIOError at once instead of waiting for it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)


def lock_holder(folder):
    """The id of the process that holds the flock on folder, as Linux's /proc/locks tells it; None where it cannot."""
    stat = os.stat(folder)
    # /proc/locks names a file as MAJOR:MINOR:INODE, the device numbers in hex
    file_id = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK ADVISORY WRITE PID FILE ...": a process waiting for the lock has "->" before FLOCK
                if fields[1:2] == ["FLOCK"] and len(fields) > 5 and fields[5] == file_id and fields[4] != "0":
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def fsync(path):  # a file's or a folder's contents on disk, before a rename declares them complete
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_utf8(source, text_path, read_bytes, bar=None, translate_newlines=False):
    """The UTF-8 text of the binary file source, read_bytes at a time -> iterator of pieces of text.

    bar: a progress bar to advance by the bytes of each piece once it has been used. translate_newlines: \\r\\n
    and \\r become \\n, as Python's text files read them.
    """
    utf8 = codecs.getincrementaldecoder("utf-8")()
    if translate_newlines:
        utf8 = io.IncrementalNewlineDecoder(utf8, translate=True)
    n_read = 0
    while piece := read_piece(source, read_bytes, text_path):
        yield decode_utf8(utf8, piece, n_read, text_path)
        n_read += len(piece)
        if bar is not None:
            bar.update(len(piece))
    yield decode_utf8(utf8, b"", n_read, text_path)  # b"": a character left unfinished is an error


def read_piece(source, n_bytes, text_path):  # the next n_bytes (fewer at the end) of source, a binary file
    try:
        return source.read(n_bytes)
    except OSError as e:
        raise GPT2Error(f"cannot read {text_path} ({e.strerror})") from None


def decode_utf8(utf8, piece, offset, text_path):
    """The text of piece, the bytes of text_path from offset on, through the incremental decoder utf8."""
    n_held = len(utf8.getstate()[0])  # bytes of a character that the previous piece began
    try:
        return utf8.decode(piece, final=not piece)
    except UnicodeDecodeError as e:
        at = offset - n_held + e.start
        raise GPT2Error(f"{text_path} is not valid UTF-8 text ({e.reason} at byte {at}): save it as UTF-8") from None
