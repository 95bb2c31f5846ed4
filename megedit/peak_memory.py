"""Peak memory of a block of work: resident memory sampled in a thread, and CUDA's own peak where there is a GPU."""
from __future__ import annotations

import os
import threading

import torch


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled), and peak CUDA memory where there is one."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_rss, self._stop = interval, 0, threading.Event()

    def _rss(self) -> int:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())
        self.peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def reported_gb(rss_gb: float, cuda_gb: float | None) -> float:
    """The peak a run reports: its GPUs' where it ran on them (the model lives there), else resident memory."""
    return rss_gb if cuda_gb is None else cuda_gb
