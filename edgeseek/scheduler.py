"""Continuous batching for the server: one thread owns the engine and decodes every running request
together, one `BatchGenerator.step` (one forward_rows) per step.

A request (a `Job`) waits in a bounded queue; between two steps the scheduler drops the requests
whose clients left, then admits waiting ones while fewer than `parallel` run: each is prefilled on
its own (after the prefix a finished sequence's cache already holds, from the ContextPool) and joins
the batch at the next step. Whatever a job produces goes to its `deliver` callback, called on the
scheduler thread: each Delta, or an exception that ended it. Nothing here knows about HTTP.
"""
from __future__ import annotations

import itertools
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .errors import EdgeseekError
from .generation import BatchGenerator, ContextPool
from .sampler import SamplerConfig


class ServerClosing(EdgeseekError):
    """The server is shutting down: the request was stopped."""


@dataclass(eq=False)
class Job:
    ids: list[int]  # the prompt's token ids
    max_tokens: int
    sampler: SamplerConfig
    stop: list[str]
    deliver: Callable[[object], None]  # a Delta, or the exception that ended the job
    ignore_eos: bool = False  # only max_tokens and stop strings end it (benchmarks)
    cancelled: bool = False
    uid: int = -1  # the sequence in the BatchGenerator, once admitted
    context: object = field(default=None, repr=False)


class Scheduler:
    def __init__(self, engine, parallel: int = 8, queue: int = 64, keep: int | None = None):
        """`keep`: finished sequences' caches kept for the requests that continue them (default:
        `parallel`; 0: every prompt is prefilled whole)."""
        self.engine = engine
        self.parallel = parallel
        self.queue_limit = queue
        self.gen = BatchGenerator(engine)
        self.pool = ContextPool(engine, parallel if keep is None else keep)
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._cancelled: list[Job] = []
        self._running: dict[int, Job] = {}
        self._closing = False
        self._uids = itertools.count()
        self.steps = 0  # decode steps run
        self.tokens = 0  # tokens sampled, first tokens included
        self.peak_batch = 0  # the most sequences one step decoded
        self._thread = threading.Thread(target=self._loop, name="edgeseek-scheduler", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stops every job (each gets ServerClosing) and the thread, after the step under way."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def submit(self, job: Job) -> bool:
        """Queues a job; False when the queue is full (or the server is closing): beyond the free
        slots, at most `queue` jobs wait (0: none)."""
        with self._lock:
            if self._closing or len(self._waiting) >= self.queue_limit + max(0, self.parallel - len(self._running)):
                return False
            self._waiting.append(job)
            self._lock.notify()
        return True

    def cancel(self, job: Job) -> None:
        """The client left: the job's slot is freed before the next step (its cache pooled)."""
        with self._lock:
            if job.cancelled:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
            else:
                self._cancelled.append(job)
                self._lock.notify()

    def load(self) -> dict:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting), "parallel": self.parallel,
                    "queue_limit": self.queue_limit, "steps": self.steps, "tokens": self.tokens,
                    "peak_batch": self.peak_batch}

    # --- the scheduler thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._waiting or self._cancelled or self.gen):
                    self._lock.wait()
                if self._closing:
                    break
                cancelled, self._cancelled = self._cancelled, []
            try:
                for job in cancelled:
                    self._finish(job, self.gen.remove(job.uid) if job.uid in self._running else None)
                while len(self.gen) < self.parallel:
                    with self._lock:
                        if not self._waiting:
                            break
                        job = self._waiting.popleft()
                    if not job.cancelled:
                        self._admit(job)
                if self.gen:
                    self._step()
            except Exception as e:  # noqa: BLE001  (a bug here fails the running requests, not the server)
                self._fail_running(_reported(e))
        with self._lock:
            jobs = list(self._running.values()) + list(self._waiting)
            self._waiting.clear()
        for job in jobs:
            self._finish(job)
            job.deliver(ServerClosing("the server is shutting down"))

    def _admit(self, job: Job) -> None:
        job.uid = next(self._uids)
        with self._lock:  # its slot is taken while the prompt is prefilled: `submit` counts it
            self._running[job.uid] = job
        context = None
        try:
            context = self.pool.take(job.ids)
            first = self.gen.add(job.ids, max_tokens=job.max_tokens, sampler=job.sampler, stop=job.stop,
                                 uid=job.uid, context=context, ignore_eos=job.ignore_eos)
        except Exception as e:  # noqa: BLE001  (one request's failure is that request's)
            with self._lock:
                self._running.pop(job.uid, None)
            if context is not None:
                context.reset()
                self.pool.give(context)
            job.deliver(_reported(e))
            return
        self.tokens += 1
        job.context = context
        job.deliver(first)
        if first.finish_reason:
            self._finish(job)

    def _step(self) -> None:
        self.peak_batch = max(self.peak_batch, len(self.gen))
        try:
            deltas = self.gen.step()
        except Exception as e:  # noqa: BLE001  (the step's requests fail; the server goes on)
            self._fail_running(_reported(e))
            return
        self.steps += 1
        self.tokens += len(deltas)
        for d in deltas:
            job = self._running.get(d.uid)
            if job is None:
                continue
            job.deliver(d)
            if d.finish_reason:
                self._finish(job)

    def _fail_running(self, failure: Exception) -> None:
        for job in list(self._running.values()):
            self.gen.remove(job.uid)
            self._finish(job, reset=True)
            job.deliver(failure)
        self.gen = BatchGenerator(self.engine)  # nothing half-added left behind

    def _finish(self, job: Job, context=None, reset: bool = False) -> None:
        """The job leaves the batch; its cache goes to the pool for a later turn to continue."""
        with self._lock:
            self._running.pop(job.uid, None)
        context = context or job.context
        job.context = None
        if context is not None:
            if reset:
                context.reset()
            self.pool.give(context)


def _reported(e: Exception) -> Exception:
    """An exception for the job's client; one that is no user mistake is printed for the operator."""
    if not isinstance(e, (EdgeseekError, MemoryError)):
        traceback.print_exception(e)
    return e
