"""The next jobs of a claim in fair order, read from the ledger only as far as the claim
goes (``Ledger.release``, and every admission that has room: ``jobs/ledger.py``).

A claim releases the few held jobs its window has room for, in the order of
``jobs/fairness.py``: the tenant whose last release is oldest (smallest last tenant tag;
then the oldest job), and within it the user whose last release is oldest (smallest
last user tag; then the oldest job); that user's oldest job goes. A claim used to read
each user's oldest job, make a Python object of it and order them all: with every held
job another user's (the shape of a big backlog, as a user may have two jobs queued by
default), a backlog of 10,000 cost each release about 110 ms and each admission with
model affinity about 40 ms, most of it in Python (``bench.backlog --users``).

Here SQLite does the reading and ordering, and Python takes from it only what the claim
releases:

* the tenants with jobs held, a row per tenant and model: how many, and the oldest
  (one grouped read of ``idx_jobs_unclaimed_models``, in its order), and each tenant's
  last tags;
* when a tenant is first served, its users in order of (last user tag, oldest job),
  from a cursor over ``idx_jobs_unclaimed`` that SQLite sorted: Python steps only as
  far as the claim goes (read again when a model fills meanwhile);
* when a user is first served, its oldest jobs of each model (the window's room for
  that model is how many it can release).

A tenant none of whose jobs the file holds (only the job being admitted is held: the
common case while renderers keep up) needs neither of the last two reads: its one user
and job are known.

Every key only grows while a claim goes on: a tenant or user served takes the newest
tag of its lane or tenant, and a model whose window fills takes its jobs out of the
order (with model affinity), so a user's or tenant's oldest job can only get newer. So
the keys read before serving are lower bounds, and a heap of them gives the exact order:
an entry is taken only when its current key, computed again, is still the smallest.
Exact ties in age go to the smaller job id, as in :func:`~jobs.fairness.fair_order`.

``tests/test_ledger_claim_reach.py`` checks, with Hypothesis, that a claim releases
exactly what ordering every held job releases.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from jobs.fairness import Clocks, Release, Tags, Waiting


def unclaimed(index: str = "idx_jobs_unclaimed") -> str:
    """FROM and WHERE of the held jobs of a lane (its parameter) that no release has
    claimed, read through ``index``, a covering partial index of them (the columns read
    here are all in it: no table row is read)."""
    return (
        f"FROM jobs INDEXED BY {index} WHERE lane = ? AND status = 'queued' "
        "AND published = 0 AND claimed_at IS NULL"
    )


UNCLAIMED = unclaimed()
#: A job's age and id as one string that sorts as (created_at, job_id) does: ' ' sorts
#: before every character of an ISO time.
_FIRST = "created_at || ' ' || job_id"

#: (last tag, created_at, job_id): a tenant's or user's place; smaller goes first.
Key = tuple[int, str, str]


def lane_clock(db: sqlite_utils.Database, lane: str) -> int:
    """The tenant tag of ``lane``'s last release (0: none yet)."""
    (clock,) = db.execute(
        "SELECT COALESCE(MAX(tenant_tag), 0) FROM fair_tags WHERE lane = ?", [lane]
    ).fetchone()
    return int(clock)


def last_tags(db: sqlite_utils.Database, lane: str, tenant: str) -> tuple[int, int] | None:
    """``tenant``'s last tenant tag and its clock (None: never served in ``lane``). A
    tenant's tags grow with each of its releases, so its last release's row holds both:
    one step down ``idx_fair_tags_tenant``."""
    last = db.execute(
        "SELECT tenant_tag, user_tag FROM fair_tags WHERE lane = ? AND tenant = ? "
        "ORDER BY tenant_tag DESC LIMIT 1",
        [lane, tenant],
    ).fetchone()
    return None if last is None else (int(last[0]), int(last[1]))


def _first(joined: str) -> tuple[str, str]:
    created_at, _, job_id = joined.rpartition(" ")
    return created_at, job_id


def _raw(name: str) -> list[str | None]:
    """The stored values a tenant or user name of the order stands for ("": none)."""
    return [name] if name else [None, ""]


def _is(column: str, name: str) -> tuple[str, list[str | None]]:
    raws = _raw(name)
    return "(" + " OR ".join(f"{column} IS ?" for _ in raws) + ")", raws


@dataclass
class _User:
    tenant: str
    user: str
    #: model -> its jobs this claim may reach, oldest first.
    jobs: dict[str | None, deque[Waiting]]


@dataclass
class _Tenant:
    name: str
    #: Each model's held jobs of it (this claim's releases taken off), and the oldest
    #: of them as the claim began: (created_at, job_id).
    counts: dict[str | None, int] = field(default_factory=dict)
    firsts: dict[str | None, tuple[str, str]] = field(default_factory=dict)
    #: Whether the file holds any of its jobs (else only the job being admitted is
    #: held: its users and jobs need no reading, the common case while renderers keep up).
    stored: bool = False
    #: Whether this claim released one of its jobs (its tag is then the lane's newest).
    served: bool = False
    #: Its users in order of their keys as SQLite read them (lower bounds), the next of
    #: them, and how many models had filled when that read began.
    cursor: sqlite3.Cursor | None = None
    ahead: tuple[Key, str] | None = None
    #: How many models had filled when its users were last read (-1: never read).
    drops: int = -1
    #: Its users read so far, by key (checked again when taken).
    heap: list[tuple[Key, str]] = field(default_factory=list)
    users: dict[str, _User] = field(default_factory=dict)


class ClaimOrder:
    """One claim's fair order over the held jobs of ``lane`` (see the module docstring),
    read inside the caller's transaction. ``rooms``: each model's room (model affinity),
    ``default_room`` for the models not in it; ``new``: a job this transaction is about
    to insert, held with the others."""

    def __init__(
        self,
        db: sqlite_utils.Database,
        lane: str,
        rooms: Mapping[str | None, int],
        default_room: int,
        new: Waiting | None = None,
    ) -> None:
        self._db = db
        self._lane = lane
        self._left = dict(rooms)
        self._default = default_room
        self._new = new
        #: How many models' rooms ran out during this claim (each may make keys grow).
        self._drops = 0
        self._tenants: dict[str, _Tenant] = {}
        #: How many jobs are held in all (the new one too), once :meth:`releases` ran.
        self.held = 0

    def releases(self, limit: int | None = None) -> list[tuple[Release, Waiting]]:
        """The claim's releases in order, each with its job: while any held job's model
        has room, and at most ``limit``."""
        try:
            return self._releases(limit)
        finally:
            for tenant in self._tenants.values():
                if tenant.cursor is not None:
                    tenant.cursor.close()  # read no further, before the claim writes

    def _releases(self, limit: int | None) -> list[tuple[Release, Waiting]]:
        self._read_held()
        models = {model for tenant in self._tenants.values() for model in tenant.counts}
        if all(self._room(model) <= 0 for model in models):
            return []  # every model held waits for room: no tags to read
        clocks = self._clocks()
        heap: list[tuple[Key, str]] = []
        for name, tenant in self._tenants.items():
            key = self._tenant_key(clocks, tenant)
            if key is not None:
                heap.append((key, name))
        heapq.heapify(heap)
        order: list[tuple[Release, Waiting]] = []
        while heap and (limit is None or len(order) < limit):
            if all(self._room(model) <= 0 for model in models):
                break  # every model held waits for room
            key, name = heapq.heappop(heap)
            tenant = self._tenants[name]
            current = self._tenant_key(clocks, tenant)
            if current is None:  # nothing of it may go now
                continue
            if current != key:  # it grew: a model filled since
                heapq.heappush(heap, (current, name))
                continue
            user = self._next_user(clocks, tenant)
            assert user is not None  # a model with room has a job of the tenant's
            job = self._oldest(user)
            assert job is not None  # _next_user gives a user with a job that may go
            user.jobs[job.model].popleft()
            release = clocks.release(job.job_id, job.tenant, job.user)
            order.append((release, job))
            tenant.served = True
            tenant.counts[job.model] -= 1
            self._left[job.model] = self._room(job.model) - 1
            if self._left[job.model] <= 0:
                self._drops += 1
            self._push(clocks, tenant, user)
            current = self._tenant_key(clocks, tenant)
            if current is not None:
                heapq.heappush(heap, (current, name))
        return order

    def _tenant_key(self, clocks: Clocks, tenant: _Tenant) -> Key | None:
        """A tenant's key now (None: none of its jobs may go). Once served in this claim,
        its tag is the lane's newest, which no other tenant has: its oldest job decides
        nothing. Before that, its oldest job that may go is the oldest, as the claim
        began, of the models that have room."""
        may_go = self._may_go(tenant)
        if not may_go:
            return None
        tag = clocks.tenant_last.get(tenant.name, 0)
        if tenant.served:
            return (tag, "", "")
        return (tag, *min(tenant.firsts[model] for model in may_go))

    def _may_go(self, tenant: _Tenant) -> list[str | None]:
        """The models of ``tenant``'s held jobs that have room now."""
        return [
            model for model, count in tenant.counts.items() if count > 0 and self._room(model) > 0
        ]

    def _room(self, model: str | None) -> int:
        return self._left.setdefault(model, self._default)

    def _eligible(self) -> tuple[str, list[Any]]:
        """The SQL condition on ``model`` of the jobs that may go now, and its parameters."""
        if self._default > 0:
            full = [model for model, left in self._left.items() if left <= 0]
            named = [model for model in full if model is not None]
            condition = f"model NOT IN ({', '.join('?' for _ in named)})"
            if None in full:
                return f"(model IS NOT NULL AND {condition})", named
            return (f"(model IS NULL OR {condition})" if named else "1"), named
        open_ = [model for model, left in self._left.items() if left > 0]
        named = [model for model in open_ if model is not None]
        parts = [f"model IN ({', '.join('?' for _ in named)})"] if named else []
        if None in open_:
            parts.append("model IS NULL")
        return "(" + (" OR ".join(parts) or "0") + ")", named

    def _read_held(self) -> None:
        """The tenants with jobs held, per model: how many, and the oldest. Counts the
        held jobs."""
        db, lane = self._db, self._lane
        # In the order of idx_jobs_unclaimed_models: no sort. MIN(created_at) makes the
        # bare job_id that of an oldest job (SQLite's rule).
        rows: list[tuple[Any, ...]] = db.execute(
            "SELECT tenant, model, COUNT(*), MIN(created_at), job_id "
            f"{unclaimed('idx_jobs_unclaimed_models')} "
            "GROUP BY tenant, model",
            [lane],
        ).fetchall()
        stored = len(rows)
        new = self._new
        if new is not None:
            rows.append((new.tenant, new.model, 1, new.created_at, new.job_id))
        moments: dict[str, set[str]] = {}
        for at, (raw, model, count, created_at, job_id) in enumerate(rows):
            self.held += count
            tenant = self._tenants.setdefault(raw or "", _Tenant(raw or ""))
            tenant.stored = tenant.stored or at < stored
            tenant.counts[model] = tenant.counts.get(model, 0) + count
            first = (created_at, job_id)
            known = tenant.firsts.get(model)
            tenant.firsts[model] = first if known is None else min(known, first)
            moments.setdefault(created_at, set()).add(tenant.name)
        for created_at, names in moments.items():
            if len(names) > 1:  # tenants tie on an age: the smallest job id decides
                self._exact_ids(created_at, names)

    def _clocks(self) -> Clocks:
        """The lane's clock, and the last tags of the tenants with a job that may go (the
        others take no part in this claim)."""
        tenant_last: dict[str, int] = {}
        tenant_clock: dict[str, int] = {}
        for name, tenant in self._tenants.items():
            if not self._may_go(tenant):
                continue
            last = last_tags(self._db, self._lane, name)
            if last is not None:
                tenant_last[name], tenant_clock[name] = last
        return Clocks(Tags(lane_clock(self._db, self._lane), tenant_last, tenant_clock, {}))

    def _exact_ids(self, created_at: str, names: set[str]) -> None:
        """For ``names``' oldest jobs made at ``created_at``: the smallest job id of
        each (the grouped read gave one of them)."""
        for name in names:
            tenant = self._tenants[name]
            where, raws = _is("tenant", name)
            for model, first in list(tenant.firsts.items()):
                if first[0] != created_at:
                    continue
                (smallest,) = self._db.execute(
                    f"SELECT MIN(job_id) {UNCLAIMED} AND {where} AND model IS ? AND created_at = ?",
                    [self._lane, *raws, model, created_at],
                ).fetchone()
                if smallest is not None:
                    tenant.firsts[model] = (created_at, min(first[1], str(smallest)))

    def _next_user(self, clocks: Clocks, tenant: _Tenant) -> _User | None:
        """``tenant``'s user whose job goes next, or None: none of its jobs may go."""
        if tenant.drops < self._drops:
            # (Again after a model filled: its jobs' users would be read one by one.)
            self._open(clocks, tenant)
        while True:
            top = tenant.heap[0] if tenant.heap else None
            if tenant.ahead is not None and (top is None or tenant.ahead < top):
                (tag, _, _), name = tenant.ahead
                tenant.ahead = self._step(tenant)
                if name not in tenant.users:  # (a user stored both as NULL and "": once)
                    self._push(clocks, tenant, self._load(clocks, tenant, name, tag))
                continue
            if top is None:
                return None
            key, name = heapq.heappop(tenant.heap)
            user = tenant.users[name]
            current = self._user_key(clocks, user)
            if current is None:
                continue
            if current != key:  # it grew: a model filled since
                heapq.heappush(tenant.heap, (current, name))
                continue
            return user

    def _open(self, clocks: Clocks, tenant: _Tenant) -> None:
        """Start reading ``tenant``'s users in order of their keys (lower bounds); first
        load the user of the job being admitted, whose key that read cannot know."""
        if tenant.cursor is not None:
            tenant.cursor.close()
        tenant.drops = self._drops
        eligible, params = self._eligible()
        where, raws = _is("jobs.tenant", tenant.name)
        new = self._new
        skip, skipped = "", list[str | None]()
        if new is not None and new.tenant == tenant.name:
            clause, skipped = _is("jobs.user", new.user)
            skip = f" AND NOT {clause}"
            if new.user not in tenant.users:
                self._push(clocks, tenant, self._load(clocks, tenant, new.user, None))
        if not tenant.stored:  # nobody else's jobs to read
            tenant.cursor, tenant.ahead = None, None
            return
        # The user's tag joined from fair_tags (no row: 0); the other columns named are
        # the job's (fair_tags has no model, created_at or job_id).
        tenant.cursor = self._db.execute(
            f"SELECT jobs.user, MIN({_FIRST}) AS first, COALESCE(fair_tags.user_tag, 0) "
            "AS tag FROM jobs INDEXED BY idx_jobs_unclaimed LEFT JOIN fair_tags "
            "ON fair_tags.lane = jobs.lane AND fair_tags.tenant = ? "
            "AND fair_tags.user = COALESCE(jobs.user, '') WHERE jobs.lane = ? "
            "AND jobs.status = 'queued' AND jobs.published = 0 AND jobs.claimed_at IS NULL "
            f"AND {where} AND {eligible}{skip} GROUP BY jobs.user ORDER BY tag, first",
            [tenant.name, self._lane, *raws, *params, *skipped],
        )
        tenant.ahead = self._step(tenant)

    @staticmethod
    def _step(tenant: _Tenant) -> tuple[Key, str] | None:
        """The next user of ``tenant``'s read, with the lower bound of its key."""
        assert tenant.cursor is not None
        row = tenant.cursor.fetchone()
        if row is None:
            return None
        user, first, tag = row
        return (int(tag), *_first(str(first))), user or ""

    def _load(self, clocks: Clocks, of: _Tenant, name: str, tag: int | None) -> _User:
        """A user's oldest held jobs of each model, as many as that model's room now (it
        can release no more of them), with the job being admitted if it is theirs; and
        its last user tag (``tag``, else read)."""
        db, tenant = self._db, of.name
        listed: list[Waiting] = []
        if of.stored:
            tenant_is, tenant_raws = _is("tenant", tenant)
            user_is, user_raws = _is("user", name)
            reach = max([self._default, *self._left.values()])
            listed = [
                Waiting(job_id, tenant, name, created_at, model)
                for job_id, created_at, model in db.execute(
                    "SELECT job_id, created_at, model FROM (SELECT job_id, created_at, model, "
                    "ROW_NUMBER() OVER (PARTITION BY model ORDER BY created_at, job_id) AS n "
                    f"{UNCLAIMED} AND {tenant_is} AND {user_is}) WHERE n <= ?",
                    [self._lane, *tenant_raws, *user_raws, reach],
                ).fetchall()
            ]
        new = self._new
        if new is not None and (new.tenant, new.user) == (tenant, name):
            listed.append(new)
        listed.sort(key=lambda job: (job.created_at, job.job_id))
        jobs: dict[str | None, deque[Waiting]] = {}
        for job in listed:
            kept = jobs.setdefault(job.model, deque())
            if len(kept) < self._room(job.model):
                kept.append(job)
        if tag is None:
            row = db.execute(
                "SELECT user_tag FROM fair_tags WHERE lane = ? AND tenant = ? AND user = ?",
                [self._lane, tenant, name],
            ).fetchone()
            tag = 0 if row is None else int(row[0])
        clocks.user_last.setdefault((tenant, name), tag)
        return _User(tenant, name, jobs)

    def _push(self, clocks: Clocks, tenant: _Tenant, user: _User) -> None:
        """Put ``user`` in ``tenant``'s order, by its key now (if any job of it may go)."""
        tenant.users[user.user] = user
        key = self._user_key(clocks, user)
        if key is not None:
            heapq.heappush(tenant.heap, (key, user.user))

    def _oldest(self, user: _User) -> Waiting | None:
        """``user``'s oldest job that may go now."""
        heads = [jobs[0] for model, jobs in user.jobs.items() if jobs and self._room(model) > 0]
        return min(heads, key=lambda job: (job.created_at, job.job_id), default=None)

    def _user_key(self, clocks: Clocks, user: _User) -> Key | None:
        job = self._oldest(user)
        if job is None:
            return None
        return (clocks.user_last.get((user.tenant, user.user), 0), job.created_at, job.job_id)
