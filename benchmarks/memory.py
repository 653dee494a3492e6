"""Peak memory of a block of code, shared by every part that reports `peak_memory_mb`.

What it measures: on a GPU, `torch.cuda.max_memory_allocated` above what was allocated when the block began; on the
CPU, the process's RSS increase, sampled every 2 ms by a thread. How the CPU number is kept honest: torch allocates
with glibc malloc, which keeps freed blocks for reuse, so an RSS increase would depend on what earlier trainers in
this process left behind. While measuring, blocks of 64 KiB and more are mmapped and unmapped on free
(M_MMAP_THRESHOLD), and freed pages are handed back first (malloc_trim), so the RSS follows the memory in use; glibc's
default threshold is restored after. Linux/glibc only (the benchmark's machines).
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time

import psutil
import torch


class PeakMemory:
    """Peak memory while the block runs, in bytes above its start (`increase`, set on exit): the CUDA peak allocated
    on a GPU, else the RSS increase sampled every 2 ms, with glibc made to return freed blocks (module docstring)."""

    def __enter__(self):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
            _libc().malloc_trim(0)  # hand freed pages back, so the base is what is really in use
            self.process, self._running = psutil.Process(), True
            self.base = self.peak = self.process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._running = False
            self._thread.join()
            _mallopt(_M_MMAP_THRESHOLD, 128 * 1024)  # glibc's initial threshold
        self.increase = max(self.peak - self.base, 0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _libc():
    return ctypes.CDLL("libc.so.6")


def _mallopt(parameter: int, value: int):
    _libc().mallopt(parameter, value)
