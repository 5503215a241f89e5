"""Retention: done commands older than COMMAND_RETENTION leave the database, and the pages they
held go back to the file system, so the file stays as large as a retention's worth of commands.

Run from a thread that already owns a Store (the flusher): ``run_if_due`` costs one clock read
until the next run is due. A run deletes in short batches (each its own transaction, so the
listener and the workers get the write lock between them) within a time budget, then gives a
bounded number of free pages back; a backlog (the first run on a year-old file) is worked off
over the next passes, a run every ``busy_interval`` until none is left.
"""

from __future__ import annotations

import logging
import time

from errors import StoreUnavailable
from outbox.store import Store

log = logging.getLogger("cockpit_agent.retention")


class Retention:
    """Prunes one Store's done commands; used by the thread that owns the Store."""

    interval = 300.0  # s between runs with nothing left to prune
    busy_interval = 1.0  # s between runs while a backlog is left
    batch = 200  # commands per transaction
    budget = 0.05  # s of pruning per run (about ten batches of echos)
    pages = 1024  # free pages given back per run at most: 4 MiB at SQLite's page size
    keep_free = 256  # free pages left in the file (1 MiB): reused by the next writes
    failed_interval = 3600.0  # s before a failed one-off VACUUM is tried again

    def __init__(self, store: Store, retention: float):
        """``retention``: seconds a done command is kept (COMMAND_RETENTION)."""
        self.store, self.retention = store, retention
        self.next_run = 0.0  # store.clock() time of the next run
        self.next_vacuum = 0.0
        self.pruned = 0  # commands pruned by this object, for the log and the soak

    def run_if_due(self) -> None:
        """Run when it is time; never raises (a failed run is logged and tried again later)."""
        if self.store.clock() >= self.next_run:
            self.run()

    def run(self) -> int:
        """One run: prune a time budget's worth, give pages back; how many commands went."""
        now = self.store.clock()
        removed, backlog = 0, False
        try:
            started = time.monotonic()
            while True:
                n = self.store.prune(now - self.retention, self.batch)
                removed += n
                if n < self.batch:
                    break
                if time.monotonic() - started >= self.budget:
                    backlog = True
                    break
            if self.store.incremental():
                free = self.store.free_pages()
                if free > self.keep_free:  # a little slack: the next inserts take those pages again
                    left = self.store.vacuum_step(min(self.pages, free - self.keep_free))
                    backlog = backlog or left > self.keep_free
            elif not backlog and now >= self.next_vacuum:
                self._switch_to_incremental(now)
        except StoreUnavailable as exc:
            log.warning("pruning commands older than %d s failed (%s); trying again in %d s",
                        self.retention, exc, self.interval)
            backlog = False
        self.pruned += removed
        self.next_run = now + (self.busy_interval if backlog else self.interval)
        if removed:
            log.debug("pruned %d commands done before %d s ago", removed, self.retention)
        return removed

    def _switch_to_incremental(self, now: float) -> None:
        """A file an older agent made cannot give pages back until it is VACUUMed once: done
        after the first prune, when it is as small as it gets."""
        before = self.store.size()
        started = time.monotonic()
        try:
            self.store.vacuum()
        except StoreUnavailable as exc:
            self.next_vacuum = now + self.failed_interval
            log.warning("one-off VACUUM of %s failed (%s): pruned pages are reused but not given back; "
                        "trying again in %d s", self.store.path, exc, self.failed_interval)
            return
        log.info("%s rewritten once (VACUUM, %.1f s) so that pruning shrinks it: %.1f MB -> %.1f MB",
                 self.store.path, time.monotonic() - started, before / 1e6, self.store.size() / 1e6)
