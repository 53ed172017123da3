"""Eviction policies of the expert cache: which cached expert to drop when a new one comes in.
Both keep their own bookkeeping; the store asks `victim(cached, keep)` and reports every use,
admission and token."""
from __future__ import annotations

import heapq


class AgingFrequency:
    """Eviction by frequency with exponential aging: an expert's score is the sum over its uses of
    decay^(tokens since that use), so a burst of use fades and steady use stays. Kept in the
    order-preserving form sum g^-t (g = decay, t the token of each use), which never needs
    rescoring as tokens pass; a heap of (score, key) with stale entries skipped finds the lowest."""

    def __init__(self, decay: float = 0.98):
        self.growth = 1.0 / decay
        self.boost = 1.0  # g^-now
        self.score: dict = {}
        self.heap: list = []

    def use(self, key, cached: bool) -> None:
        s = self.score.get(key, 0.0) + self.boost
        self.score[key] = s
        if cached:
            heapq.heappush(self.heap, (s, key))

    def head_start(self, key, value: float) -> None:
        self.score[key] = value

    def admit(self, key) -> None:
        heapq.heappush(self.heap, (self.score.get(key, 0.0), key))

    def victim(self, cached, keep: set):
        """The cached key of lowest score outside `keep`, or None."""
        skipped, found = [], None
        while self.heap:
            s, key = heapq.heappop(self.heap)
            if key not in cached or s != self.score.get(key, 0.0):
                continue  # stale entry
            if key in keep:
                skipped.append((s, key))
                continue
            found = key
            break
        for item in skipped:
            heapq.heappush(self.heap, item)
        return found

    def tick(self, cached) -> None:
        self.boost *= self.growth
        if self.boost > 1e100:  # renormalize; the order of scores is unchanged
            scale = 1.0 / self.boost
            self.score = {k: v * scale for k, v in self.score.items()}
            self.heap = [(self.score[k], k) for k in cached]
            heapq.heapify(self.heap)
            self.boost = 1.0


class LeastRecentlyUsed:
    """Plain LRU, the baseline the aging policy is measured against (bench/bench_policy.py)."""

    def __init__(self):
        from collections import OrderedDict
        self.order = OrderedDict()

    def use(self, key, cached: bool) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def head_start(self, key, value: float) -> None:
        pass

    def admit(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def victim(self, cached, keep: set):
        for key in self.order:
            if key in cached and key not in keep:
                del self.order[key]
                return key
        return None

    def tick(self, cached) -> None:
        pass
