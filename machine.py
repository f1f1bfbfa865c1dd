"""What runs fastest on this machine: measured once, then remembered.

The same product of a few rows by GPT-2's weights can be asked of OpenBLAS in several forms, and which is fastest
depends on the CPU. On an AMD EPYC (AVX2) one row times weights stored [n_out, n_in] ran 12-18 % faster than times
the checkpoint's [n_in, n_out], and 8 rows 10 % slower; on an Intel Xeon (AVX-512) one row ran no faster either way,
while 8 rows ran 1.5 times as fast with the weights stored [n_out, n_in] and the product asked for as w.T @ x.T
(OpenBLAS then takes the 8 rows as its small dimension). No layout fixed in advance is right for every CPU, so the
first load on a machine times each candidate on matrices of GPT-2 124M's shapes, larger together than a CPU's cache,
and keeps the winner in ~/.cache/gpt2-numpy/machine.json (under XDG_CACHE_HOME if set), for this CPU, this NumPy and
its BLAS's kernels.

The vocabulary's product, many times larger than any other weight's, is timed on its own and may go in another form,
and so are the matrices of GPT-2's wider sizes.

Other work that can be done more than one way is timed the same way, once per shape, the first time it is asked for
(fastest), and its winner kept in the same file.
"""
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from allocator import release_freed_memory
from files import write_text_atomically
from params import layout, leaves
from threads import in_parts, openblas_kernels

# The layouts of a linear layer's weight: the checkpoint's [n_in, n_out], or a copy stored [n_out, n_in] (the fast
# layout, fast_layout.py), which params hand out as its transpose, so that w is [n_in, n_out] either way.
CHECKPOINT, TRANSPOSED = "checkpoint", "transposed"
LAYOUTS = (CHECKPOINT, TRANSPOSED)
VOCABULARY = "vocabulary"  # its weight, timed in measure() beside the layouts' (it has one: [n_vocab, n_embd])


def in_blocks(x, w):  # (w.T @ x.T).T with w.T cut into blocks of n_in rows, a product each
    # each block's product keeps OpenBLAS's working memory small: the vocabulary's whole [n_vocab, n_embd] at once
    # took 52 MB more of it for a batch, in blocks 9 MB, and ran a fifth faster
    stored, n_in = w.T, w.shape[0]
    return np.concatenate([stored[i : i + n_in] @ x.T for i in range(0, len(stored), n_in)]).T


# OpenBLAS's SkylakeX kernels take a product of at most SMALL_PRODUCT multiply-adds and (with one operand transposed,
# as x @ w.T is to it) SMALL_RESULTS results as it is; any larger product is first copied into OpenBLAS's own layout
SMALL_PRODUCT, SMALL_RESULTS = 10**6, 1200


def in_small_parts(x, w):  # x @ w with w.T cut into blocks that OpenBLAS takes as they are, in parts, one per core
    # For a few rows, the copy of w is most of the time of a product. A product that small runs on one thread, so the
    # blocks go in parts. Eight rows times 124M's vocabulary: 8.4 ms, where blocks of 768 rows of w.T took 15.8 and
    # blocks too large to be taken as they are, in parts, 21 (Intel Xeon, AVX-512)
    stored, (m, n_in) = w.T, x.shape
    n_rows = max(1, min(SMALL_RESULTS // m, SMALL_PRODUCT // (m * n_in)))  # of w.T in a block
    n_blocks = len(stored) // n_rows
    y = np.empty((m, len(stored)), x.dtype)
    blocks = stored[: n_blocks * n_rows].reshape(n_blocks, n_rows, n_in).swapaxes(1, 2)
    y_blocks = y[:, : n_blocks * n_rows].reshape(m, n_blocks, n_rows).swapaxes(0, 1)  # views of y, written in place
    in_parts(lambda part: np.matmul(x, blocks[part], out=y_blocks[part]), n_blocks, 1, small_products=True)
    np.matmul(x, stored[n_blocks * n_rows :].T, out=y[:, n_blocks * n_rows :])
    return y


# Forms of x @ w, for x of a few rows and w stored [n_out, n_in] (w.T C-ordered): as written; as (w.T @ x.T).T; that
# in blocks; and in blocks small enough for OpenBLAS to take as they are, in parts
ROWS_FORMS = {
    "plain": lambda x, w: x @ w,
    "transposed": lambda x, w: (w.T @ x.T).T,
    "blocks": in_blocks,
    "small_parts": in_small_parts,
}


def gpt2_layout(n_embd):  # -> the params tree's shapes of a GPT-2 of this width, one layer deep
    return layout({"n_vocab": 50257, "n_ctx": 1024, "n_embd": n_embd, "n_head": 1, "n_layer": 1})


def timed_shapes(n_embd):  # -> [n_in, n_out] of a GPT-2 layer's weights, the layer repeated to at least 200 MB
    # several times the largest cache a CPU of these machines has, so that each product reads its weights from
    # memory, as a model's do
    layer = [shape for path, shape in leaves(gpt2_layout(n_embd)["blocks"]) if path[-1] == "w"]
    return layer * math.ceil(200e6 / sum(4 * n_in * n_out for n_in, n_out in layer))


TIMED_SHAPES = timed_shapes(768)  # GPT-2 124M's, 227 MB
# n_embd of GPT-2 355M, 774M and 1558M: their matrices get the form of a few rows measured at their own shapes. Each
# product's hand-off to a second thread costs the same at any size, so the forms in parts gain on larger matrices:
# 8 rows through 1558M's took 28.9 ms in small blocks in parts, 40.8 in blocks of n_in rows (Intel Xeon, 368 MB)
WIDER = (1024, 1280, 1600)
TIMED_ROWS = 8  # a batch's rows, or a short prompt's
MANY_ROWS = 32  # a prompt's, or an uncached sequence's: where OpenBLAS's product as written may be back in front
VOCABULARY_SHAPE = gpt2_layout(768)["wte"][::-1]  # [n_embd, n_vocab] of GPT-2 124M: the vocabulary's weight
# Raised whenever the way a form runs changes (which can change which form wins), so that choices measured before
# are measured again
FORMS_VERSION = 2
N_ROUNDS = 3  # the candidates run in turn, round after round, and each keeps its median: drift hits all alike
N_TRIALS = 2  # fastest's ways, each its least time of two: a way's first run also pays for touching new memory

_choices = None  # this process's, once read or measured


def cache_path():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-numpy" / "machine.json"


def machine_key():  # -> what the choices depend on: the CPU, how many cores, NumPy, its BLAS, the BLAS's kernels, and
    # the way the forms run (FORMS_VERSION)
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return (f"{cpu_name()}; {os.cpu_count()} cores; NumPy {np.__version__}; {blas['name']} {blas['version']} "
            f"({openblas_kernels() or 'unknown'} kernels); forms {FORMS_VERSION}")


def cpu_name(cpuinfo="/proc/cpuinfo"):  # -> the CPU's name, with its family and model where the system gives them
    # a virtual machine may name different CPUs alike ("Intel(R) Xeon(R) Processor" for models 167 and 207), and
    # they rank the forms differently
    try:
        with open(cpuinfo) as lines:
            fields = {name.strip(): value.strip()
                      for name, value in (line.split(":", 1) for line in lines if ":" in line)}
    except OSError:
        fields = {}
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    model = ", ".join(f"{name} {fields[name]}" for name in ("cpu family", "model") if name in fields)
    return f"{fields['model name']} ({model})" if model else fields["model name"]


def choices():
    """{"layout": CHECKPOINT or TRANSPOSED, "rows_form": a key of ROWS_FORMS, "most_rows": the most rows that form
    serves, "vocabulary_form": the form of a few rows for the vocabulary's weight, "wider_forms": {n_embd: the form
    for the matrices of that WIDER size}, ...}: this machine's, from the cache, else measured (about four seconds,
    once) and kept there."""
    global _choices
    if _choices is None:
        _choices = cached_choices()
        if _choices is None:
            _choices = dict(measure(), machine=machine_key())
            keep(_choices)
    return _choices


def cached_choices():  # -> the cache's choices if they are valid and this machine's, else None
    try:
        cached = json.loads(cache_path().read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return cached if isinstance(cached, dict) and cached.get("machine") == machine_key() and valid(cached) else None


def keep(chosen):  # writes the choices to the cache
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(cache_path(), json.dumps(chosen, indent=2) + "\n")
    except OSError:  # a read-only home: the choices hold for this process, and are measured again next time
        pass


def valid(cached):
    fastest_ways = cached.get("fastest", {})
    return (cached.get("layout") in LAYOUTS and cached.get("rows_form") in ROWS_FORMS
            and cached.get("vocabulary_form") in ROWS_FORMS and isinstance(cached.get("wider_forms"), dict)
            and cached["wider_forms"].keys() == {str(n_embd) for n_embd in WIDER}
            and all(form in ROWS_FORMS for form in cached["wider_forms"].values())
            and cached.get("most_rows") in (2 * TIMED_ROWS, MANY_ROWS) and isinstance(fastest_ways, dict)
            and all(isinstance(way, str) for way in fastest_ways.values()))


def fastest(task, ways):
    """The name of the fastest of ways ({name: a function of no arguments}, each doing the same work) at task (a
    text naming that work and what its time depends on, such as its shapes) on this machine: measured the first
    time it is asked for, each way run N_TRIALS times in turn and its least time kept, then remembered in the cache
    (at GPT-2 124M's training step, about four seconds, once)."""
    chosen = choices().setdefault("fastest", {})
    if chosen.get(task) not in ways:  # another process may have measured it since this one read the cache
        chosen.update((cached_choices() or {}).get("fastest", {}))
    if chosen.get(task) not in ways:
        seconds = dict.fromkeys(ways, math.inf)
        for _ in range(N_TRIALS):
            for name, way in ways.items():
                started = time.perf_counter()
                way()
                seconds[name] = min(seconds[name], time.perf_counter() - started)
                release_freed_memory()  # a way's freed temporaries, kept for reuse, would add to the next one's
        chosen[task] = min(seconds, key=seconds.get)
        keep(choices())
    return chosen[task]


def measure(shapes=TIMED_SHAPES):
    """Time one row, TIMED_ROWS and MANY_ROWS rows through matrices of the given shapes ([n_in, n_out]) in each
    layout and form, and TIMED_ROWS rows through the vocabulary's weight and the matrices of each WIDER size in each
    form -> the choices: the layout with the least time per token of single and batched decoding, the form of a few
    rows for weights stored [n_out, n_in], up to how many rows that form beats the product as written, and the forms
    of a few rows for the vocabulary's weight (stored [n_vocab, n_embd] in every layout) and the wider sizes'."""
    # the values do not matter to the time (they are no subnormals), so they are all 1, quick to write
    weights = {TRANSPOSED: [np.ones((n_out, n_in), np.float32).T for n_in, n_out in shapes],
               CHECKPOINT: [np.ones((n_in, n_out), np.float32) for n_in, n_out in shapes],
               VOCABULARY: [np.ones(VOCABULARY_SHAPE[::-1], np.float32).T]}
    candidates = {(layout, 1, "plain"): weights[layout] for layout in LAYOUTS}
    candidates |= {(CHECKPOINT, TIMED_ROWS, "plain"): weights[CHECKPOINT]}
    candidates |= {(TRANSPOSED, m, form): weights[TRANSPOSED] for m in (TIMED_ROWS, MANY_ROWS) for form in ROWS_FORMS}
    candidates |= {(VOCABULARY, TIMED_ROWS, form): weights[VOCABULARY] for form in ROWS_FORMS}
    ms = median_ms(candidates)
    del weights, candidates
    wider_forms = {}
    for n_embd in WIDER:  # one size's matrices at a time, in memory
        stored = [np.ones((n_out, n_in), np.float32).T for n_in, n_out in timed_shapes(n_embd)]
        ms |= median_ms({(f"n_embd {n_embd}", TIMED_ROWS, form): stored for form in ROWS_FORMS})
        wider_forms[str(n_embd)] = min(ROWS_FORMS, key=lambda form: ms[(f"n_embd {n_embd}", TIMED_ROWS, form)])
    rows_form = min(ROWS_FORMS, key=lambda form: ms[(TRANSPOSED, TIMED_ROWS, form)])
    per_token = {layout: ms[(layout, 1, "plain")] + ms[(layout, TIMED_ROWS, "plain" if layout == CHECKPOINT
                                                         else rows_form)] / TIMED_ROWS for layout in LAYOUTS}
    # the form chosen at 8 rows serves up to 32 rows where it still beats the product as written there (on the
    # Intel Xeon the blocks form took 30-40 % less time from 16 to 32 rows, and at 64 rows about as much), else
    # up to 16
    most_rows = MANY_ROWS if ms[(TRANSPOSED, MANY_ROWS, rows_form)] < ms[(TRANSPOSED, MANY_ROWS, "plain")] \
        else 2 * TIMED_ROWS
    vocabulary_form = min(ROWS_FORMS, key=lambda form: ms[(VOCABULARY, TIMED_ROWS, form)])
    return {"layout": min(per_token, key=per_token.get), "rows_form": rows_form, "most_rows": most_rows,
            "vocabulary_form": vocabulary_form, "wider_forms": wider_forms,
            "measured_ms": {f"{what}, {m} rows, {form}": round(t, 2) for (what, m, form), t in ms.items()}}


def median_ms(candidates):  # {(what, m, form): weights} -> {the same: ms of m rows through them in that form}
    # the candidates in turn, round after round, each keeping its median
    shapes = {(m, w.shape[0]) for (_, m, _), ws in candidates.items() for w in ws}
    rows = {shape: np.ones(shape, np.float32) for shape in shapes}  # [m, n_in]
    seconds = {candidate: [] for candidate in candidates}
    for _ in range(N_ROUNDS):
        for (what, m, form), ws in candidates.items():
            started = time.perf_counter()
            for w in ws:
                ROWS_FORMS[form](rows[m, w.shape[0]], w)
            seconds[(what, m, form)].append(time.perf_counter() - started)
    return {candidate: 1000 * statistics.median(times) for candidate, times in seconds.items()}


def rows_times(x, w):  # [m, n_in], [n_in, n_out] -> [m, n_out]: x @ w, in the form this machine runs fastest
    # The forms differ for a few rows, whose product is bound by reading w. One row is a matrix-vector product in
    # any form; from some tens of rows on (at 2 flops per row for each 4 bytes of w, memory's 10-25 GB/s feed about
    # the 100-200 GFLOP/s of two cores' vector units) reading w no longer takes the time, and the form as written
    # runs at the speed of OpenBLAS's large products and hands out its rows as a C-ordered array
    return in_form(x, w, form_of)


def form_of(w):  # -> the form chosen for a few rows times w: its GPT-2 size's, by its smaller side (n_embd)
    chosen = choices()
    return chosen["wider_forms"].get(str(min(w.shape)), chosen["rows_form"])


def vocabulary_times(x, wte):  # [m, n_embd], [n_vocab, n_embd] -> [m, n_vocab]: the logits x @ wte.T, likewise
    return in_form(x, wte.T, lambda _: choices()["vocabulary_form"])


def in_form(x, w, form_of_w):  # x @ w, for a few rows in the form form_of_w(w) names (a key of ROWS_FORMS)
    # the form looked up only for a few rows: a decode step's single row asks for 49 products
    if not 1 < len(x) <= choices()["most_rows"] or w.flags.c_contiguous:
        return x @ w
    return ROWS_FORMS[form_of_w(w)](x, w)
