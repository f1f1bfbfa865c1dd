"""How many threads NumPy's math uses."""
import ctypes
import warnings
from pathlib import Path

from errors import GPT2Warning


def set_blas_threads(n_threads):
    """Make NumPy's OpenBLAS use n_threads threads, though NumPy has loaded it already (OPENBLAS_NUM_THREADS is read
    only then): as threadpoolctl does, by calling the setter OpenBLAS exports, in the library this process loaded."""
    setters = ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
               "scipy_openblas_set_num_threads64_")
    found = False
    for path in loaded_libraries("openblas"):
        library = ctypes.CDLL(path)
        for setter in (getattr(library, name) for name in setters if hasattr(library, name)):
            setter(n_threads)
            found = True
    if not found:
        warnings.warn(GPT2Warning("threads has no effect: this NumPy's BLAS is not OpenBLAS; set OMP_NUM_THREADS "
                                  "before starting Python instead", arguments=("threads",)))


def loaded_libraries(name_part):  # paths of the shared libraries this process has mapped whose name holds name_part
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return set()
    paths = (line.split(None, 5)[-1] for line in maps.splitlines())  # the sixth field, where a line has one
    return {path for path in paths if path.startswith("/") and name_part in Path(path).name.lower()}
