r"""A paged optimizer, simulated: AdamW whose states live in a host pool and are paged in per update.

QLoRA's paged optimizers (Dettmers et al. 2023, arXiv:2305.14314, §3) put the optimizer states
in NVIDIA unified memory: pages move to the GPU when a kernel touches them and are evicted to CPU
RAM when the GPU runs out, so a memory spike (a long sequence, a big batch) slows a step down
instead of crashing it. This module simulates that with NumPy arrays and counts what moves:

* the *host pool*: every state tensor (``exp_avg``, ``exp_avg_sq``, float32) has a range of
  pages there, each tensor starting on a page boundary;
* the *device*: ``device_bytes // page_bytes`` page frames;
* updating a parameter needs all pages of its two states on the device. A page that is not
  there is a *fault*: it is copied in (``bytes_in += page_bytes``); when no frame is free, the
  least recently used page not needed by this update is written back (``bytes_out``) and its
  frame reused. Pages are always written back (an update dirties every page it touches).

The numbers are the same as :class:`~lowrank_ref.optim.adam.AdamW`'s, bit for bit (the same
float32 arithmetic on the same values); only where the values sit, and the traffic, differ.
With a device large enough for every state, the only traffic is the first touch of each page.
How much a smaller device costs depends on the sizes and the order. For equal-sized parameters
swept in the same order every step, LRU evicts the pages needed soonest: a device short of the
states by ``k`` pages makes every update fault ``min(k, its own pages)``, so once it is short by a
whole parameter's states, every step moves the whole state in and out (twice its size). With
mixed sizes it can be much less (a test has 12 of 46 pages moving per step with 40 fitting).
``lowrank_ref.experiments.qlora_experiments.paged_traffic`` measures it; tests/quant checks both.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from lowrank_ref.optim.adam import AdamW, adam_direction

__all__ = ["PagedAdamW"]


class PagedAdamW(AdamW):
    """``PagedAdamW(params, lr=1e-3, ..., page_bytes=4096, device_bytes=None)``.

    ``device_bytes=None`` gives a device that holds every state (traffic only at first touch).
    Counters: ``bytes_in``, ``bytes_out``, ``faults``, ``evictions`` (see :meth:`traffic`).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, page_bytes: int = 4096, device_bytes: int | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if isinstance(page_bytes, bool) or not isinstance(page_bytes, (int, np.integer)) or page_bytes < 4 or page_bytes % 4:
            raise ValueError(f"page_bytes must be a positive multiple of 4, got {page_bytes!r}")
        self.page_bytes = int(page_bytes)
        self.page_elems = self.page_bytes // 4
        # the layout: (name, key) -> (first page, number of pages, size, shape)
        self._layout: dict[tuple[str, str], tuple[int, int, int, tuple]] = {}
        page = 0
        for name, p in self.params.items():
            n_pages = -(-p.size // self.page_elems)
            for key in ("exp_avg", "exp_avg_sq"):
                self._layout[(name, key)] = (page, n_pages, p.size, p.shape)
                page += n_pages
        self.n_pages = page
        self.host = np.zeros((page, self.page_elems), dtype=np.float32)  # the host pool
        need = max(2 * -(-p.size // self.page_elems) for p in self.params.values())
        n_frames = page if device_bytes is None else int(device_bytes) // self.page_bytes
        if n_frames < need:
            raise ValueError(f"device_bytes={device_bytes} holds {n_frames} pages of {self.page_bytes} B; "
                             f"the largest parameter's two states need {need} pages")
        self.device = np.zeros((n_frames, self.page_elems), dtype=np.float32)  # the page frames
        self._where: OrderedDict[int, int] = OrderedDict()  # resident page -> frame (LRU order)
        self._free = list(range(n_frames))[::-1]
        self.bytes_in = self.bytes_out = self.faults = self.evictions = 0

    # -- paging ---------------------------------------------------------------------------
    def _page_in(self, pages: range) -> None:
        needed = set(pages)
        for pg in pages:
            if pg in self._where:
                self._where.move_to_end(pg)  # recently used
                continue
            self.faults += 1
            if not self._free:  # evict the least recently used page this update does not need
                victim = next(v for v in self._where if v not in needed)
                frame = self._where.pop(victim)
                self.host[victim] = self.device[frame]  # write back, device -> host
                self.bytes_out += self.page_bytes
                self.evictions += 1
                self._free.append(frame)
            frame = self._free.pop()
            self.device[frame] = self.host[pg]  # page in, host -> device
            self.bytes_in += self.page_bytes
            self._where[pg] = frame

    def _gather(self, name: str, key: str) -> np.ndarray:
        first, n_pages, size, shape = self._layout[(name, key)]
        frames = [self._where[pg] for pg in range(first, first + n_pages)]
        return self.device[frames].reshape(-1)[:size].reshape(shape).copy()

    def _scatter(self, name: str, key: str, value: np.ndarray) -> None:
        first, n_pages, size, _ = self._layout[(name, key)]
        flat = np.zeros(n_pages * self.page_elems, dtype=np.float32)
        flat[:size] = value.reshape(-1)
        for i, pg in enumerate(range(first, first + n_pages)):
            self.device[self._where[pg]] = flat[i * self.page_elems: (i + 1) * self.page_elems]

    def _update(self, name, param, grad, state):
        grad = self._decay(param, grad)
        pm = self._layout[(name, "exp_avg")]
        pv = self._layout[(name, "exp_avg_sq")]
        self._page_in(range(pm[0], pm[0] + pm[1] + pv[1]))  # both states' pages (contiguous)
        work = {"step": state.get("step", 0),
                "exp_avg": self._gather(name, "exp_avg"), "exp_avg_sq": self._gather(name, "exp_avg_sq")}
        d = adam_direction(grad.astype(np.float32, copy=False), work, self.betas, self.eps, self.lr)
        state["step"] = work["step"]
        self._scatter(name, "exp_avg", work["exp_avg"])
        self._scatter(name, "exp_avg_sq", work["exp_avg_sq"])
        param.data = (param.data + d).astype(param.data.dtype, copy=False)

    # -- inspection -----------------------------------------------------------------------
    def read_state(self, name: str, key: str) -> np.ndarray:
        """The current value of a state tensor wherever it sits (no traffic counted)."""
        first, n_pages, size, shape = self._layout[(name, key)]
        rows = [self.device[self._where[pg]] if pg in self._where else self.host[pg]
                for pg in range(first, first + n_pages)]
        return np.concatenate(rows)[:size].reshape(shape)

    def traffic(self) -> dict:
        return {"bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "faults": self.faults,
                "evictions": self.evictions, "device_bytes": self.device.nbytes, "host_bytes": self.host.nbytes}

    def state_bytes(self) -> int:
        """Device bytes reserved for states (the page frames); the host pool is :meth:`traffic`'s."""
        return int(self.device.nbytes)
