"""The order in which a frontend hands its waiting jobs to the broker: round robin across
tenants (guilds, API tenants) within a lane, and across users within a tenant.

Why here, and not a scheduler process or a queue per user
---------------------------------------------------------
A frontend admits its jobs into its ledger and releases them to the lane's queue only
while fewer than a *window* of its jobs wait there (about two per worker serving the
lane: enough that no worker waits on us, few enough that the order stays ours). The rest
wait in the ledger, and each release picks the next job by this module's order. So the
broker queue stays short and FIFO, and fairness is decided where the jobs are known,
with no new moving part:

* no central scheduler to run, elect or lose: each frontend orders its own tenants'
  jobs (a guild belongs to one bot, an API tenant to the API); when a frontend is down
  its users can neither submit nor see results anyway, its jobs already released still
  render, and those it holds are released when it is back (they are in its ledger);
* no queue per user or per guild at the broker, whose number would grow with the
  community and which every worker would have to discover and poll;
* frontends share a lane as peers: each keeps at most its window in the queue, so none
  can flood it, whatever its users do.

The order: start-time fair queueing, twice
------------------------------------------
Every release gives the job two tags. Its **tenant tag** is one more than the larger of
the lane's clock (the tenant tag of the last job released in the lane) and its tenant's
last tenant tag; its **user tag** is one more than the larger of the tenant's clock (the
user tag of the tenant's last release) and its user's last user tag. The next job is
the one whose tenant has the smallest next tenant tag, and within that tenant whose user
has the smallest next user tag (ties: the one served least recently, then the oldest
job); the user's oldest job goes. A tenant or user that was idle comes back at the
current round, with no credit saved up, and one with a backlog gets one turn per round.
With one user holding 50 jobs and nine others 2 each, all nine first jobs are released
before the heavy user's next one.

The tags depend only on releases, not on when jobs finish, so the order of the jobs
waiting now is fixed until new jobs arrive: queue positions are read off the same
order (``Ledger.position``), and what users are shown is what happens.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Waiting:
    """A job held in the ledger, as the order sees it."""

    job_id: str
    tenant: str
    user: str
    created_at: str
    #: Where it waits at the broker once released (its model's queue with model
    #: affinity), when each destination has its own window; None: the lane's queue.
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Tags:
    """What the released jobs of a lane left: the lane's clock, each tenant's last tenant
    tag and clock (its last user tag), each user's last user tag. 0 = never."""

    lane_clock: int
    tenant_last: Mapping[str, int]
    tenant_clock: Mapping[str, int]
    user_last: Mapping[tuple[str, str], int]


@dataclass(frozen=True, slots=True)
class Release:
    job_id: str
    tenant_tag: int
    user_tag: int


#: The jobs an order is made of: tenant -> user -> the user's jobs, oldest first. Its
#: order (and each tenant's) is the order in which they first appear: exact ties go to
#: the earlier.
Held = dict[str, dict[str, deque[Waiting]]]


def fair_order(
    waiting: Iterable[Waiting],
    tags: Tags,
    *,
    limit: int | None = None,
    until: str | None = None,
    room: Mapping[str | None, int] | None = None,
    default_room: int = 0,
) -> list[Release]:
    """``waiting`` in release order, with the tags each release gives (the first
    ``limit``, or up to and including ``until``). With ``room`` (per model, see
    :attr:`Waiting.model`; ``default_room`` for models not in it), a model's jobs take
    part only while their destination has room: the order is the fair order of the jobs
    that can go now, and a user whose jobs all wait for full destinations keeps its turn.
    Jobs made at the same moment go in order of their ids (so an order read from the
    ledger in any row order, ``jobs/claims.py``, is the same).

    The ledger does not call this: claims read their order from SQLite
    (``jobs/claims.py``) and positions take :func:`release_sequence` (whose fallback
    uses the heaps below). This is the order as defined, which the tests check both of
    them against."""
    if room is None:
        return _with_heaps(_hold(waiting), tags, limit, until)
    left = dict(room)
    return _one_by_one(
        _hold(job for job in waiting if left.setdefault(job.model, default_room) > 0),
        tags,
        limit,
        until,
        left,
    )


def release_sequence(waiting: Iterable[Waiting], tags: Tags) -> list[Waiting]:
    """``waiting`` in the order :func:`fair_order` releases it without room, without the
    tags (a queued job's position needs its place only: ``Ledger.position``).

    When the tags are as releases leave them (no tenant's last tag past the lane's clock,
    no user's past its tenant's clock), a tenant served takes the lane's newest tag, and
    a user served its tenant's newest: the tenants simply take turns, in the order of
    their keys as the order begins (last tag, then oldest job), each giving its users'
    jobs in turns likewise. Those turns take O(n), where the heaps of :func:`fair_order`
    cost O(n log n) and an object per release (10,000 held jobs of as many users:
    about 100 ms against about 10). Tags no releases could leave get the heaps."""
    held = _hold(waiting)
    if not _as_released(held, tags):
        jobs = {
            job.job_id: job for users in held.values() for queue in users.values() for job in queue
        }
        return [jobs[release.job_id] for release in _with_heaps(held, tags, None, None)]
    # Sorting is stable: equal last tags keep the order of first appearance, which is
    # that of the oldest jobs (the keys' next part) and of the seats (the last part).
    tenants = sorted(held, key=lambda tenant: tags.tenant_last.get(tenant, 0))
    return _turns([_tenant_turns(tenant, held[tenant], tags) for tenant in tenants])


def _tenant_turns(tenant: str, users: dict[str, deque[Waiting]], tags: Tags) -> list[Waiting]:
    """``tenant``'s held jobs in the order it releases them: its users in turns, in the
    order of their last user tags (ties: first appearance, as for the tenants)."""
    order = sorted(users, key=lambda user: tags.user_last.get((tenant, user), 0))
    return _turns([users[user] for user in order])


def _hold(waiting: Iterable[Waiting]) -> Held:
    """``waiting`` by tenant and user, each user's jobs oldest first (exact ties: by id)."""
    held: Held = defaultdict(lambda: defaultdict(deque))
    for job in sorted(waiting, key=lambda j: (j.created_at, j.job_id)):
        held[job.tenant][job.user].append(job)
    return held


def _as_released(held: Held, tags: Tags) -> bool:
    """Whether ``tags`` are as releases leave them for the tenants and users of ``held``:
    no tenant's last tag past the lane's clock, no user's past its tenant's clock."""
    for tenant, users in held.items():
        if tags.tenant_last.get(tenant, 0) > tags.lane_clock:
            return False
        clock = tags.tenant_clock.get(tenant, 0)
        if any(tags.user_last.get((tenant, user), 0) > clock for user in users):
            return False
    return True


def _turns(queues: Sequence[Sequence[Waiting]]) -> list[Waiting]:
    """One from each queue in turn, those emptied dropping out, until none is left (each
    queue still in play gives its n-th at the n-th turn: nothing is copied or popped)."""
    order: list[Waiting] = []
    playing = [queue for queue in queues if queue]
    turn = 0
    while playing:
        order += [queue[turn] for queue in playing]
        turn += 1
        playing = [queue for queue in playing if len(queue) > turn]
    return order


def _one_by_one(
    held: Held,
    tags: Tags,
    limit: int | None,
    until: str | None,
    left: dict[str | None, int] | None,
) -> list[Release]:
    """The order as the module's docstring says it, each release choosing among every
    tenant and then every user of it: O(n x tenants + n x users of a tenant)."""
    clocks = Clocks(tags)
    order: list[Release] = []
    while held and (limit is None or len(order) < limit):
        tenant = min(
            held, key=lambda t: _tenant_key(t, held[t], clocks.lane_clock, clocks.tenant_last)
        )
        users = held[tenant]
        clock = clocks.tenant_clock.get(tenant, 0)
        user = min(users, key=lambda u: _user_key(tenant, u, users[u], clock, clocks.user_last))
        job = users[user].popleft()
        order.append(clocks.release(job.job_id, tenant, user))
        if not users[user]:
            del users[user]
        if not users:
            del held[tenant]
        if left is not None:
            left[job.model] -= 1
            if left[job.model] <= 0:
                _drop(held, job.model)
        if until is not None and job.job_id == until:
            break
    return order


def _with_heaps(held: Held, tags: Tags, limit: int | None, until: str | None) -> list[Release]:
    """:func:`_one_by_one` without room, in O(n log n). A tenant's next tenant tag,
    ``max(lane clock, its last) + 1``, grows with its last tag, so the tenant that goes
    next is the one with the smallest last tag, then the oldest job (:func:`_tenant_key`
    in another form); likewise a user within its tenant. Those keys change only for
    the one served, so heaps hold them: a backlog of 10,000 in about 20 ms (session 9's
    machine), where choosing among every tenant and user took about 190 ms. Positions
    go faster still (:func:`release_sequence`). A tenant's oldest job comes from a heap
    of its users' oldest, whose entries that went stale are dropped when met. Exact ties
    go where :func:`_one_by_one` sends them (the order of ``held``)."""
    clocks = Clocks(tags)
    # Per tenant: its users by (last user tag, oldest job, seat), and by (oldest job, seat).
    next_user: dict[str, list[tuple[int, str, int, str]]] = {}
    oldest: dict[str, list[tuple[str, int, str]]] = {}
    for tenant, users in held.items():
        seats = list(enumerate(users.items()))
        next_user[tenant] = [
            (clocks.user_last.get((tenant, user), 0), jobs[0].created_at, seat, user)
            for seat, (user, jobs) in seats
        ]
        oldest[tenant] = [(jobs[0].created_at, seat, user) for seat, (user, jobs) in seats]
        heapq.heapify(next_user[tenant])
        heapq.heapify(oldest[tenant])
    next_tenant = [
        (clocks.tenant_last.get(tenant, 0), oldest[tenant][0][0], seat, tenant)
        for seat, tenant in enumerate(held)
    ]
    heapq.heapify(next_tenant)
    order: list[Release] = []
    while next_tenant and (limit is None or len(order) < limit):
        _, _, tenant_seat, tenant = heapq.heappop(next_tenant)
        users = held[tenant]
        _, _, user_seat, user = heapq.heappop(next_user[tenant])
        job = users[user].popleft()
        release = clocks.release(job.job_id, tenant, user)
        order.append(release)
        if users[user]:
            first = users[user][0].created_at
            heapq.heappush(next_user[tenant], (release.user_tag, first, user_seat, user))
            heapq.heappush(oldest[tenant], (first, user_seat, user))
        else:
            del users[user]
        if users:
            key = (release.tenant_tag, _oldest(oldest[tenant], users), tenant_seat, tenant)
            heapq.heappush(next_tenant, key)
        else:
            del held[tenant]
        if until is not None and job.job_id == until:
            break
    return order


class Clocks:
    """The tags as an order goes: :class:`Tags` at its start, then each release's."""

    def __init__(self, tags: Tags) -> None:
        self.lane_clock = tags.lane_clock
        self.tenant_last = dict(tags.tenant_last)
        self.tenant_clock = dict(tags.tenant_clock)
        self.user_last = dict(tags.user_last)

    def release(self, job_id: str, tenant: str, user: str) -> Release:
        """Release ``job_id`` of ``tenant``'s ``user``: its tags, which become the clocks."""
        release = Release(
            job_id,
            max(self.lane_clock, self.tenant_last.get(tenant, 0)) + 1,
            max(self.tenant_clock.get(tenant, 0), self.user_last.get((tenant, user), 0)) + 1,
        )
        self.lane_clock = self.tenant_last[tenant] = release.tenant_tag
        self.tenant_clock[tenant] = self.user_last[(tenant, user)] = release.user_tag
        return release


def _oldest(firsts: list[tuple[str, int, str]], users: Mapping[str, deque[Waiting]]) -> str:
    """When the oldest of ``users``' jobs was made, from the heap of their oldest jobs
    (entries of users served since, or gone, are dropped)."""
    while True:
        created_at, _, user = firsts[0]
        jobs = users.get(user)
        if jobs and jobs[0].created_at == created_at:
            return created_at
        heapq.heappop(firsts)


def _drop(held: Held, model: str | None) -> None:
    """Remove ``model``'s jobs from ``held``: its destination is full."""
    for tenant in list(held):
        users = held[tenant]
        for user in list(users):
            kept = deque(job for job in users[user] if job.model != model)
            if kept:
                users[user] = kept
            else:
                del users[user]
        if not users:
            del held[tenant]


def _tenant_key(
    tenant: str, users: Mapping[str, deque[Waiting]], lane_clock: int, last: Mapping[str, int]
) -> tuple[int, int, str]:
    """Next tenant tag, then least recently served, then oldest job."""
    previous = last.get(tenant, 0)
    oldest = min(jobs[0].created_at for jobs in users.values())
    return (max(lane_clock, previous) + 1, previous, oldest)


def _user_key(
    tenant: str,
    user: str,
    jobs: deque[Waiting],
    clock: int,
    last: Mapping[tuple[str, str], int],
) -> tuple[int, int, str]:
    """Next user tag, then least recently served, then oldest job."""
    previous = last.get((tenant, user), 0)
    return (max(clock, previous) + 1, previous, jobs[0].created_at)
