"""allocator.py: a step's temporaries reuse the memory the last step freed instead of faulting in fresh pages."""
import subprocess
import sys

import pytest

from conftest import ROOT

# A step of a few temporaries of one training step's sizes (a baby GPT's [768, 512] gelu), run 20 times after a first
# run, in a fresh interpreter (the setting is the process's): whether keep_freed_memory took, and the page faults of
# those 20 steps, with or without it first
STEPS = """
import resource, sys
import numpy as np
from allocator import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    x = np.ones((768, 512), np.float32)
    y = x * x
    return float(np.exp(y, out=y)[0, 0] + (x + y)[0, 0])
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def steps(mode):  # -> (whether the setting took, the page faults of 20 steps)
    took, faults = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.split()
    return took == "True", int(faults)


def test_a_repeated_steps_temporaries_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    took, kept = steps("keep")
    if not took:
        pytest.skip("this C library has no glibc mallopt")
    _, by_default = steps("default")
    # by default each 1.5 MiB temporary's 384 pages fault in again, step after step
    assert by_default >= 20 * 384
    assert kept <= by_default / 50
