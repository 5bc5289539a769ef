"""The progress editor: keeps each job's Discord message up to date as its events arrive.

One task per message, so a slow or rate-limited edit of one message never holds up
another; at most ``CONCURRENT_EDITS`` edits are in flight. Events only update the
message's state (the tracker calls :meth:`ProgressEditor.on_event` in its delivery
order, so it must not wait on Discord); the message's task edits at most once per
``interval`` with the newest state, so stale frames are dropped, and the terminal state
is always sent. Edits use the bot token on the channel message (the interaction token
dies after 15 minutes). A message someone deleted (404) ends its task and leaves the
job alone. On start-up, :meth:`resume` re-attaches every message whose final edit is
still owed (the ``discord_messages`` table), so a restarted bot keeps editing.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import discord
import structlog

from bot import cards
from bot.constants import (
    CONCURRENT_EDITS,
    DEFAULT_RENDER_SECONDS,
    EDIT_TIMEOUT_SECONDS,
    OLD_MESSAGE_INTERVAL_SECONDS,
    POSITION_REFRESH_SECONDS,
)
from bot.messages import JobMessage, MessageStore
from jobs.ledger import Ledger
from jobs.models import (
    Accepted,
    Event,
    Failed,
    Job,
    JobStatus,
    Preview,
    Progress,
    Succeeded,
    utcnow,
)
from storage import ObjectStore
from storage.exceptions import StorageError

if TYPE_CHECKING:
    from bot.buttons import ViewFactory

log = structlog.get_logger(__name__)

#: Times a final edit is tried before the message is given up (a restart tries again).
FINAL_ATTEMPTS = 8
#: Longest pause between two tries of a final edit. The pauses double from the
#: interval, so the result outlasts a Discord outage of a minute or two.
FINAL_RETRY_MAX_SECONDS = 30.0


@dataclass(eq=False)
class _State:
    job: Job
    message: JobMessage | None = None
    running: bool = False
    progress: Progress | None = None
    preview: Preview | None = None
    terminal: Succeeded | Failed | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: ``loop.time()`` of the last edit sent (or the first response).
    last_edit: float = 0.0
    shown_position: int | None = None
    task: asyncio.Task[None] | None = None
    final_attempts: int = 0


class ProgressEditor:
    def __init__(
        self,
        client: discord.Client,
        ledger: Ledger,
        messages: MessageStore,
        store: ObjectStore | None,
        views: ViewFactory,
        *,
        interval: float,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._messages = messages
        self._store = store
        self._views = views
        self.interval = interval
        self._states: dict[str, _State] = {}
        self._edits = asyncio.Semaphore(CONCURRENT_EDITS)
        #: Seconds a render takes, averaged over the renders seen (for ETAs).
        self.render_seconds = DEFAULT_RENDER_SECONDS
        self._closed = False

    # -- what the bot tells it ---------------------------------------------------------

    async def track(self, job: Job) -> None:
        """Start collecting ``job``'s events (before its message exists: a fast renderer
        may be ahead of the first response), and catch up with the ledger."""
        state = self._states.get(job.job_id)
        if state is None:
            state = self._states[job.job_id] = _State(job)
        record = await self._ledger.get(job.job_id)
        if record is not None:
            if record.status is JobStatus.RUNNING:
                state.running = True
            if record.terminal is not None and state.terminal is None:
                state.terminal = record.terminal
                state.changed.set()

    async def attach(self, message: JobMessage, *, shown_at: float | None = None) -> None:
        """Remember ``message`` as the one showing its job and keep it up to date.
        ``shown_at`` (``loop.time()``) is when it was last written, if just now."""
        await self._messages.save(message)
        state = self._states.get(message.job_id)
        if state is None:
            return
        state.message = message
        state.last_edit = shown_at if shown_at is not None else 0.0
        if state.task is None and not self._closed:
            state.changed.set()  # show the state reached meanwhile
            state.task = asyncio.create_task(
                self._follow(state), name=f"discord-progress-{message.job_id}"
            )

    def forget(self, job_id: str) -> None:
        """Stop editing ``job_id``'s message (it was deleted); the job is untouched."""
        state = self._states.pop(job_id, None)
        if state is not None and state.task is not None:
            state.task.cancel()

    def tracking(self, job_id: str) -> bool:
        return job_id in self._states

    async def on_event(self, event: Event) -> None:
        """The tracker's listener: note the newest state; the message's task edits."""
        if isinstance(event, Succeeded):
            render = event.timings.get("render")
            if render is not None and render > 0:
                self.render_seconds = 0.8 * self.render_seconds + 0.2 * render
        state = self._states.get(event.job_id)
        if state is None or state.terminal is not None:
            return
        if isinstance(event, Accepted):
            state.running = True
        elif isinstance(event, Progress):
            state.running = True
            state.progress = event
        elif isinstance(event, Preview):
            state.running = True
            state.preview = event
        else:
            state.terminal = event
        state.changed.set()

    def first_card(self, job: Job, position: int | None) -> cards.Card:
        """What the first response shows: the queue, or the render already under way."""
        state = self._states.get(job.job_id)
        if state is not None and state.running:
            return cards.rendering(job, state.progress, None)
        if state is not None:
            state.shown_position = position
        return cards.queued(job, position, self.eta(position))

    def eta(self, position: int | None) -> datetime | None:
        if position is None:
            return None
        return utcnow() + timedelta(seconds=position * self.render_seconds)

    async def resume(self) -> int:
        """Re-attach every message still owed its final edit. Returns how many."""
        count = 0
        for message in await self._messages.pending():
            record = await self._ledger.get(message.job_id)
            if record is None:
                await self._messages.mark_done(message.job_id)
                continue
            await self.track(record.job)
            await self.attach(message)
            count += 1
        return count

    async def close(self) -> None:
        self._closed = True
        tasks = [s.task for s in self._states.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._states.clear()

    # -- one message -------------------------------------------------------------------

    async def _follow(self, state: _State) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not state.changed.is_set():
                    with contextlib.suppress(TimeoutError):
                        # A waiting job gets no events when the queue moves: look again.
                        async with asyncio.timeout(
                            None if state.running else POSITION_REFRESH_SECONDS
                        ):
                            await state.changed.wait()
                delay = state.last_edit + self._interval(state) - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                state.changed.clear()
                terminal = state.terminal
                card = await self._card(state)
                if card is None:
                    continue
                outcome = await self._edit(state, card, final=terminal is not None)
                if outcome == "gone" or (terminal is not None and outcome == "sent"):
                    assert state.message is not None
                    await self._messages.mark_done(state.message.job_id)
                    return
                if terminal is not None:
                    state.final_attempts += 1
                    if state.final_attempts >= FINAL_ATTEMPTS:
                        log.warning("discord.edit_abandoned", job_id=state.job.job_id)
                        return
                    pause = min(
                        FINAL_RETRY_MAX_SECONDS,
                        max(self.interval, 1.0) * 2 ** (state.final_attempts - 1),
                    )
                    state.last_edit = max(state.last_edit, loop.time() + pause - self.interval)
                    state.changed.set()
        finally:
            if self._states.get(state.job.job_id) is state:
                del self._states[state.job.job_id]

    def _interval(self, state: _State) -> float:
        """The interval; longer for progress on messages over an hour old, whose edits
        Discord limits (30046). The end is never held back more than the interval."""
        if state.terminal is not None or state.message is None:
            return self.interval
        made = discord.utils.snowflake_time(state.message.message_id)
        if utcnow() - made > timedelta(hours=1):
            return max(self.interval, OLD_MESSAGE_INTERVAL_SECONDS)
        return self.interval

    async def _card(self, state: _State) -> cards.Card | None:
        job = state.job
        if isinstance(state.terminal, Succeeded):
            return cards.succeeded(job, state.terminal, await self._picture(state, state.terminal))
        if isinstance(state.terminal, Failed):
            return cards.failed(job, state.terminal)
        if state.running:
            return cards.rendering(job, state.progress, state.preview)
        position = await self._ledger.position(job.job_id)
        if position is None:  # it left the queue; its Accepted is on the way
            return None
        if position == state.shown_position:
            return None
        state.shown_position = position
        return cards.queued(job, position, self.eta(position))

    async def _picture(self, state: _State, event: Succeeded) -> cards.Attachment | None:
        if self._store is None or not event.outputs:
            return None
        assert state.message is not None
        try:
            images = [await self._store.get(output.key) for output in event.outputs[:4]]
            return await asyncio.to_thread(cards.compose, images, state.message.attachment_limit)
        except (StorageError, OSError, ValueError) as exc:
            log.warning("discord.picture_failed", job_id=event.job_id, error=str(exc))
            return None

    async def _edit(self, state: _State, card: cards.Card, *, final: bool) -> str:
        """Edit the message: ``sent``, ``gone`` (deleted: stop) or ``failed`` (try later)."""
        message = state.message
        assert message is not None
        loop = asyncio.get_running_loop()
        channel = self._client.get_partial_messageable(
            message.channel_id, guild_id=message.guild_id
        )
        target = channel.get_partial_message(message.message_id)
        view = self._views(state.job, final=final, succeeded=isinstance(state.terminal, Succeeded))
        async with self._edits:
            state.last_edit = loop.time()
            try:
                async with asyncio.timeout(EDIT_TIMEOUT_SECONDS):
                    await target.edit(
                        content=card.content,
                        embeds=card.embeds,
                        attachments=card.files(),
                        view=view,
                        allowed_mentions=cards.NO_MENTIONS,
                    )
            except discord.NotFound as exc:
                log.info("discord.message_gone", job_id=state.job.job_id, code=exc.code)
                return "gone"
            except discord.RateLimited as exc:
                # Too long to sleep for a frame: drop it, send the newest state later.
                state.last_edit = loop.time() + exc.retry_after - self.interval
                state.changed.set()
                return "failed"
            except (discord.HTTPException, TimeoutError) as exc:
                log.warning("discord.edit_failed", job_id=state.job.job_id, error=str(exc))
                return "failed"
        return "sent"
