"""worker/host_memory.py: a freed step-sized buffer is reused without page faults."""
from __future__ import annotations

import resource
import sys

import pytest
import torch

from inferd.worker.host_memory import keep_freed_memory


def _faults_filling(nbytes: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(nbytes, dtype=torch.uint8)
    x.fill_(1)  # touch every page
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_logits_sized_buffer_is_reused_without_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc")
    nbytes = 48 << 20  # 256 x 49152 float32 logits: above glibc's own 32 MiB mmap ceiling
    pages = nbytes // resource.getpagesize()
    _faults_filling(nbytes)  # the first one is faulted in once
    again = _faults_filling(nbytes)
    assert again < pages // 10, (again, pages)  # without the thresholds: every page again
