"""The workers: run a Job's handler exactly once and leave its response in the outbox.

``WorkerPool`` hands Jobs out in arrival order, one at a time per target (a repository, a
container); each ``Worker`` claims the row (queued -> running), runs the handler's child
process (handlers.execute), masks the secrets in what it printed, and records the result and
its response in one transaction (running -> done, an outbox row).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import protocol
from config import Config
from errors import StoreUnavailable
from handlers import Action, Children, Result, execute
from handlers.base import Deadline, monotonic_ms
from outbox import Store
from runtime.answers import Answers
from runtime.loop import Backoff, Loop
from service.audit import Audit


@dataclass(frozen=True)
class Job:
    """An accepted, validated command waiting for a worker."""

    command_id: str
    command: str
    action: Action
    sender: str | None = None
    params: dict[str, Any] | None = None  # as received, for the audit line
    deadline: Deadline | None = None  # when the backend stops waiting for it; None: the full timeout
    # Its decrypted params, masked in what the child prints; never in repr.
    secrets: tuple[str, ...] = field(default=(), repr=False)


class WorkerPool:
    """Hands Jobs to workers; Jobs with the same target run one at a time, in arrival order.

    ``submit`` is called in arrival order. A Job whose target already has one in flight waits
    in that target's lane, so at most one Job per target is ever on the queue or running; the
    worker that finishes it moves the next one from the lane to the queue.
    """

    def __init__(self, queue_: queue.Queue[Job | None], count: int, make_worker: Callable[[str, WorkerPool], Worker]):
        self.queue = queue_  # None wakes a worker to stop
        self._lock = threading.Lock()
        self._lanes: dict[str, deque[Job]] = {}
        self.workers = [make_worker(f"worker-{i + 1}", self) for i in range(count)]
        self.draining = threading.Event()

    def submit(self, job: Job) -> None:
        """Queue a Job now, or behind the Job already in flight for its target."""
        target = job.action.target
        if target is not None:
            with self._lock:
                if target in self._lanes:
                    self._lanes[target].append(job)
                    return
                self._lanes[target] = deque()
        self.queue.put(job)

    def pending(self) -> int:
        """Jobs accepted but not yet started (on the queue or waiting in a lane)."""
        with self._lock:
            waiting = sum(len(lane) for lane in self._lanes.values())
        return self.queue.qsize() + waiting

    def take(self, timeout: float) -> Job | None:
        """The next Job to run, or None after ``timeout`` s or once draining."""
        if self.draining.is_set():
            return None
        try:
            return self.queue.get(timeout=timeout)  # None: drain() woke us
        except queue.Empty:
            return None

    def drain(self) -> None:
        """Stop handing out Jobs (they stay queued in SQLite) and wake the idle workers now."""
        self.draining.set()
        for _ in self.workers:
            self.queue.put(None)

    def done(self, job: Job) -> None:
        """Release ``job``'s target: the next Job waiting for it goes on the queue."""
        target = job.action.target
        if target is None:
            return
        with self._lock:
            lane = self._lanes[target]
            if not lane:
                del self._lanes[target]
                return
            following = lane.popleft()
        self.queue.put(following)

    def forget(self) -> None:
        """Drop every Job not yet taken (before the workers start): a start-up recovery that
        failed midway queues them all again."""
        with self._lock:
            self._lanes.clear()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return

    def running(self) -> list[str]:
        """The command_ids the workers are running now."""
        return [worker.current.command_id for worker in self.workers if worker.current is not None]

    def start(self) -> None:
        """Start every worker."""
        for worker in self.workers:
            worker.start()


class Worker(Loop):
    """Runs Jobs: claim the row, run the handler, record the result and its response."""

    def __init__(self, name: str, config: Config, pool: WorkerPool, *, open_store: Callable[[], Store],
                 children: Children, answers: Answers, audit: Audit, on_done: Callable[[str, str, int], None],
                 wake_flusher: Callable[[], None], force_stop: threading.Event):
        """``on_done`` counts a finished command; ``wake_flusher`` tells the flusher its response
        is in the outbox; ``force_stop`` (a second signal) ends the retries of a failed write."""
        super().__init__(name, config)
        self.pool, self.open_store, self.children, self.answers, self.audit = pool, open_store, children, answers, audit
        self.on_done, self.wake_flusher, self.force_stop = on_done, wake_flusher, force_stop
        self.current: Job | None = None

    def stall_allowance(self) -> float:
        """A running command may take its own timeout, then a kill and a drain."""
        job = self.current
        return job.action.timeout + 15 if job is not None and job.action.timeout else 0.0

    def setup(self) -> None:
        self.store = self.open_store()

    def teardown(self) -> None:
        self.store.close()

    def loop_once(self) -> None:
        job = self.pool.take(timeout=0.5)
        if job is None:
            return
        self.current = job
        try:
            self.run_job(job)
        finally:
            self.current = None
            self.pool.done(job)

    def run_job(self, job: Job) -> None:
        """Run one Job exactly once and leave its response in the outbox."""
        claimed = self._claim(job.command_id)
        if not claimed:
            if claimed is False:
                self.log.warning("%s: not queued any more; not running it", job.command_id)
            return
        start = time.monotonic()
        try:
            result = execute(job.action, self.children, job.deadline)
        except Exception as exc:  # a bug must still end in an answer, not a silent 'running' row
            self.log.exception("%s: %s failed inside the agent", job.command_id, job.command)
            result = Result("error", None, f"the agent failed to run {job.command}: {type(exc).__name__}: {exc}")
        result = self.answers.redacted(result, job.secrets)
        elapsed = monotonic_ms(start)
        response, message = self.answers.answer(job.command_id, result.status, result.output, result.error, elapsed)
        backoff = Backoff()
        while True:
            try:
                if not self.store.finish(job.command_id, result.status, result.full_output, result.error, elapsed,
                                         message):
                    self.log.error("%s: ran, but its row was no longer running (answered already); this result "
                                   "was not recorded or sent", job.command_id)
                break
            except StoreUnavailable as exc:
                # The command ran; keep trying to record it rather than lose its answer.
                self.log.error("%s: cannot record the result (%s); retrying", job.command_id, exc)
                if self.force_stop.wait(backoff.next()):
                    return
        self.on_done(job.command, result.status, elapsed)
        self.wake_flusher()
        self.audit.command(job.command_id, job.sender, job.command, job.params, result.status, elapsed, result.error)
        self.log.info(
            "%s: %s %s in %d ms%s", job.command_id, job.command, result.status, elapsed,
            f": {protocol.preview(result.error, 300)}" if result.error else "",
        )

    def _claim(self, command_id: str) -> bool | None:
        """Claim the row, retrying while the database cannot be written (a full disk): the job
        exists only in memory here, so giving up would leave it queued and unanswered until the
        next start. None when a forced stop interrupts the retries."""
        backoff = Backoff()
        while True:
            try:
                return self.store.claim(command_id)
            except StoreUnavailable as exc:
                self.log.error("%s: cannot mark it running (%s); retrying", command_id, exc)
                if self.force_stop.wait(backoff.next()):
                    return None
