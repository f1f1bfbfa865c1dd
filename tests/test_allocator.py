"""allocator.py: a step's temporaries reuse the memory the last step freed instead of faulting in fresh pages."""
import subprocess
import sys

import pytest

from allocator import keep_freed_memory
from conftest import ROOT

# A step of a few temporaries of one training step's sizes (a baby GPT's [768, 512] gelu), run 20 times after a first
# run, counting the page faults of those 20 in a fresh interpreter, with or without keep_freed_memory first
STEPS = """
import resource, sys
import numpy as np
from allocator import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
def step():
    x = np.ones((768, 512), np.float32)
    y = x * x
    return float(np.exp(y, out=y)[0, 0] + (x + y)[0, 0])
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode):
    return int(subprocess.run([sys.executable, "-c", STEPS, mode], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout)


def test_a_repeated_steps_temporaries_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    if not keep_freed_memory():
        pytest.skip("this C library has no glibc mallopt")
    by_default, kept = page_faults("default"), page_faults("keep")
    # by default each 1.5 MiB temporary's 384 pages fault in again, step after step
    assert by_default >= 20 * 384
    assert kept <= by_default / 50
