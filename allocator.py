"""Freed memory kept for the next arrays, instead of being handed back to the system and faulted in again.

Every forward and backward pass makes temporaries of the same few sizes, step after step. glibc's malloc gives each
one over 128 KiB its own fresh pages (mmap), or returns the freed top of its heap to the system once more than twice
that is free, so the next step's arrays fault their memory in again, a page of 4 KiB at a time: a baby GPT's
training step took 15,000 page faults and 24 ms of system time in 91 ms, a 124M prefill of 512 tokens 8 % of its
time. Told to keep what is freed, malloc hands the same memory out again: the faults go, and peak memory stays what
it was, since the largest set of arrays alive at once still sets it.
"""
import ctypes

# mallopt's parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 1 << 30  # more than any one temporary of GPT-2's, up to a 1024-token window's logits in blocks
GLIBC_MMAP_MAX = 32 << 20  # the highest mmap threshold every glibc takes (some refuse more)


def keep_freed_memory():  # -> whether the C library took the setting
    """Make this process's malloc keep freed memory for reuse. The command lines do this at start; a program that
    calls the Python API in a loop can too. A C library other than glibc's is left as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt (macOS): that allocator keeps memory by its own rules
        return False
    # once either is set, glibc stops adjusting its thresholds by itself, so both are set, the mmap one first
    mmap_set = mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) or mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_MAX)
    return bool(mmap_set) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


def release_freed_memory():
    """Hand the memory malloc keeps freed back to the system, from every thread's heap: after work whose temporaries
    differ in size from what comes next, which could not reuse them and would add its own on top."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # no malloc_trim (macOS)
        pass
