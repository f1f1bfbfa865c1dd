"""How many threads NumPy's math uses, and work cut into parts that run on every core at once.

NumPy's BLAS (OpenBLAS) runs a large product on every core, but NumPy runs every element-wise pass (layer norm,
gelu, softmax) on one, and a small product (one of attention's heads) gains little from more. On a long prompt
that work takes about a third of the time, so the model cuts it into parts computed alone (blocks of rows, or
attention's heads) and runs a part on each core, with OpenBLAS on one thread meanwhile.
"""
import contextvars
import ctypes
import os
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from errors import GPT2Warning

SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
           "scipy_openblas_set_num_threads64_")
GETTERS = ("openblas_get_num_threads", "openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
           "scipy_openblas_get_num_threads64_")
# Ends OpenBLAS's idle threads (it starts them again at its next product on more than one thread). An idle one
# spins for about 0.1 s after each product, waiting for the next, and a thread of ours on its core gets little of
# the core meanwhile: exp over a [512, 3072] array took 4.7 ms in halves on two threads right after a product,
# 4.3 ms on one thread, and 2.5 ms in halves with OpenBLAS's threads ended (Intel Xeon, 2 cores).
STOP_IDLE = "blas_thread_shutdown_"
CORENAME_GETTERS = ("openblas_get_corename", "openblas_get_corename64_", "scipy_openblas_get_corename",
                    "scipy_openblas_get_corename64_")

# The fewest rows (positions) worth a part on a core of their own: a part's hand-off to a thread costs about 0.4 ms,
# a row of a GPT-2 124M block's passes some microseconds, of its products (which OpenBLAS runs on every core
# anyway) about 0.15 ms
MIN_PART_ROWS = 64

_openblas = _pool = None
_pool_size = 0


def set_blas_threads(n_threads):
    """Make NumPy's OpenBLAS use n_threads threads, though NumPy has loaded it already (OPENBLAS_NUM_THREADS is read
    only then): as threadpoolctl does, by calling the setter OpenBLAS exports, in the library this process loaded."""
    setters = openblas_functions(SETTERS)
    for setter in setters:
        setter(n_threads)
    if not setters:
        warnings.warn(GPT2Warning("threads has no effect: this NumPy's BLAS is not OpenBLAS; set OMP_NUM_THREADS "
                                  "before starting Python instead", arguments=("threads",)))


def openblas_functions(names):  # -> the first of names each loaded OpenBLAS exports, as C functions
    found = []
    for path in loaded_libraries("openblas"):
        library = ctypes.CDLL(path)
        found += [getattr(library, name) for name in names if hasattr(library, name)][:1]
    return found


def openblas_kernels():  # -> the CPU whose kernels NumPy's OpenBLAS runs ("Haswell", "SkylakeX"), or None
    # OpenBLAS picks them for the CPU it finds when it loads, unless the environment's OPENBLAS_CORETYPE names others
    getters = openblas_functions(CORENAME_GETTERS)
    for getter in getters:
        getter.restype = ctypes.c_char_p
    return getters[0]().decode() if getters else None


def loaded_libraries(name_part):  # paths of the shared libraries this process has mapped whose name holds name_part
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return set()
    paths = (line.split(None, 5)[-1] for line in maps.splitlines())  # the sixth field, where a line has one
    return {path for path in paths if path.startswith("/") and name_part in Path(path).name.lower()}


def in_parts(fn, n, min_part, small_products=False):  # -> [fn(part) for the parts]: slices that cover range(n)
    """One slice; or, if n is at least 2 * min_part and NumPy's OpenBLAS has more than one thread, as many slices
    as it has threads (each at least min_part long), in order, each on a thread of its own, the first on this one,
    with OpenBLAS on one thread meanwhile (so that a part's products stay on its core) and its idle threads ended
    first (so that they don't spin on the cores the parts need). Not for a process whose own threads call NumPy
    meanwhile: OpenBLAS's thread count is the whole process's.

    small_products: fn's only work is products that OpenBLAS runs on one thread at any thread count (those its small
    kernels take), and it asks for no parts itself. The count is then left as it is, and the idle threads, once
    ended, stay ended until a product needs them: with the count set back, the next product started them again.
    A batch of 8 prompts through 124M, every product of its rows in small blocks in parts, took 46.5 ms a step with
    the count set and 43.7 without (Intel Xeon, model 167)."""
    global _pool, _pool_size
    # inside a part OpenBLAS has one thread: a part that asks for parts gets one, never waits on the busy pool
    n_threads = blas_threads() if n >= 2 * min_part else 1
    n_parts = min(n_threads, n // min_part)
    if n_parts < 2:
        return [fn(slice(0, n))]
    bounds = [n * i // n_parts for i in range(n_parts + 1)]
    parts = [slice(begin, end) for begin, end in zip(bounds, bounds[1:])]
    if _pool is None or _pool_size < n_parts - 1:  # more threads than before: a larger pool, the old one ended
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(n_parts - 1), n_parts - 1
    setters, _, stop_idle = openblas()
    setters = () if small_products else setters
    for setter in setters:
        setter(1)
    for stop in stop_idle:
        stop()
    try:
        # each in a copy of this thread's context, so that NumPy's error state (np.errstate) holds in the parts too
        others = [_pool.submit(contextvars.copy_context().run, fn, part) for part in parts[1:]]
        try:
            first = fn(parts[0])
        finally:  # no part may still be running once this returns, an error or not
            wait(others)
    finally:
        for setter in setters:
            setter(n_threads)
    return [first, *(other.result() for other in others)]


def blas_threads():  # -> how many threads NumPy's OpenBLAS runs a product on, if in_parts can take them over, else 1
    setters, getters, stop_idle = openblas()
    if not getters or not len(setters) == len(getters) == len(stop_idle):
        return 1
    return min(getter() for getter in getters)


def openblas():  # -> the setters, getters and idle-thread stoppers of the OpenBLAS libraries loaded
    global _openblas
    if _openblas is None:  # looked up once: reading the process's memory map takes longer than a part's hand-off
        _openblas = openblas_functions(SETTERS), openblas_functions(GETTERS), openblas_functions((STOP_IDLE,))
    return _openblas


def forget_pool():  # in a forked child: the pool's threads were the parent's, and did not come along
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=forget_pool)
