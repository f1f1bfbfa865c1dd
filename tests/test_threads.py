"""threads.py: work in parts runs on as many threads as NumPy's OpenBLAS has, each part once and in order, with
OpenBLAS on one thread meanwhile and its thread count given back after, an error or not."""
import threading
import time

import numpy as np
import pytest

import threads


def seen(part):  # what a part records: its range, its thread, and OpenBLAS's thread count while it runs
    return part.start, part.stop, threading.get_ident(), threads.blas_threads()


def test_parts_cover_the_range_in_order_each_on_a_thread_of_its_own(blas_threads):
    blas_threads(2)
    parts = threads.in_parts(seen, 10, min_part=3)
    assert [(start, stop) for start, stop, _, _ in parts] == [(0, 5), (5, 10)]
    assert parts[0][2] == threading.get_ident() and parts[1][2] != parts[0][2]
    assert [n_threads for *_, n_threads in parts] == [1, 1]  # a part's products stay on its own core
    assert threads.blas_threads() == 2


@pytest.mark.parametrize(("n_blas", "n", "min_part", "n_parts"), [(3, 30, 10, 3), (3, 29, 10, 2), (2, 5, 3, 1),
                                                                   (1, 100, 1, 1)])
def test_as_many_parts_as_openblas_threads_when_each_gets_min_part(blas_threads, n_blas, n, min_part, n_parts):
    blas_threads(n_blas)
    parts = threads.in_parts(seen, n, min_part)
    assert len(parts) == n_parts and parts[0][0] == 0 and parts[-1][1] == n
    assert all(stop == start for (_, stop, *_), (start, *_) in zip(parts, parts[1:]))
    assert threads.blas_threads() == n_blas


def test_parts_of_small_products_leave_openblas_its_thread_count(blas_threads):
    # OpenBLAS's small kernels run on one thread at any count, and each change of the count costs
    blas_threads(2)
    parts = threads.in_parts(seen, 10, min_part=3, small_products=True)
    assert [(start, stop) for start, stop, _, _ in parts] == [(0, 5), (5, 10)]
    assert parts[0][2] == threading.get_ident() and parts[1][2] != parts[0][2]
    assert [n_threads for *_, n_threads in parts] == [2, 2] and threads.blas_threads() == 2


def test_a_part_that_asks_for_parts_gets_one(blas_threads):
    blas_threads(2)
    parts = threads.in_parts(lambda part: threads.in_parts(seen, 10, min_part=1), 10, min_part=1)
    assert [len(inner) for inner in parts] == [1, 1]


def test_a_failing_part_raises_once_every_part_has_finished(blas_threads):
    blas_threads(2)
    finished = []

    def part_fn(part):
        if part.start == 0:
            raise ValueError("the first part failed")
        time.sleep(0.2)
        finished.append(part)

    with pytest.raises(ValueError, match="the first part failed"):
        threads.in_parts(part_fn, 2, min_part=1)
    assert finished == [slice(1, 2)]
    assert threads.blas_threads() == 2


def test_parts_run_under_the_callers_numpy_error_state(blas_threads):
    blas_threads(2)
    with np.errstate(over="raise"):
        states = threads.in_parts(lambda part: np.geterr()["over"], 2, min_part=1)
    assert states == ["raise", "raise"]
