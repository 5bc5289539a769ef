"""A Discord server for tests: REST v10 and the JSON gateway, on one local port.

``DiscordEmulator`` answers what a bot built on discord.py uses, with Discord's bodies,
status codes, error codes and headers, so that the real discord.py runs against it
unmodified. discord.py is pointed at it by two assignments, made before ``login``::

    discord.http.Route.BASE = emulator.api_base           # http://127.0.0.1:PORT/api/v10
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(emulator.gateway_url)

What it copies from Discord, and how:

- REST under ``/api/v10`` (``/api/v9`` and ``/api`` answer the same): the routes of
  ``ROUTES``. Bodies are JSON with a Content-Type of exactly ``application/json``,
  or multipart with ``payload_json`` and ``files[n]`` parts. Errors have Discord's shape
  (``{"code": 50035, "errors": {...}, "message": "Invalid Form Body"}``) and codes
  (``ErrorCode``). Bot routes need ``Authorization: Bot <token>``; interaction callbacks
  and ``/webhooks/{application}/{token}`` routes take the token from the path.
- Rate limits: every answer carries ``X-RateLimit-*`` headers for its bucket (per route,
  keyed by channel, guild or webhook id and token). Buckets allow ``DEFAULT_ROUTE_LIMIT``
  unless ``route_limits`` says otherwise (``TYPICAL_ROUTE_LIMITS`` holds what Discord is
  seen to send); bot-token requests share a global limit of 50 per second, which
  interaction routes are exempt from. A 429 has ``Retry-After``, ``X-RateLimit-Scope``,
  ``Via: 1.1 google`` and ``{"message": ..., "retry_after": ..., "global": ...}``; 401,
  403 and 429 answers count in ``invalid_requests``.
- Interactions: ``send_slash_command``, ``send_autocomplete``, ``click_button``,
  ``select_values`` and ``submit_modal`` dispatch ``INTERACTION_CREATE`` payloads shaped as
  Discord's (resolved objects, member with permissions, ``app_permissions``,
  ``attachment_size_limit``, ``entitlements``, ``authorizing_integration_owners``,
  ``context``), built from the commands the bot registered. The first callback must come
  within ``interaction_response_window`` (3 s), else 10062; the token then serves
  ``/webhooks/{application}/{token}/...`` for ``interaction_token_ttl`` (15 min), else 401
  / 50027. ``?with_response=true`` answers ``{"interaction": ..., "resource": ...}``;
  without it, 204.
- Messages: a store per channel with content, embeds, components (ids assigned as Discord
  does), attachments (bytes kept, served from signed, expiring CDN URLs on the same port)
  and the history of edits. Limits: 2000 characters of content, 10 embeds and 6000
  characters across them, 10 files of at most ``attachment_size_limit`` bytes (413 /
  40005), 5 action rows of 5 buttons, ``custom_id`` of 1 to 100 characters.
- Commands: ``PUT``/``POST``/``GET``/``PATCH``/``DELETE`` of global and guild commands,
  checked against Discord's limits (names of 1 to 32 lowercase characters, descriptions
  of 1 to 100, 25 options, 25 choices, 4000 characters in all).
- Gateway (``/gateway``; ``/resume`` is the ``resume_gateway_url``): HELLO, IDENTIFY ->
  READY (guilds unavailable) then GUILD_CREATE per guild with channels, roles and members
  (all of them, and ``member_count`` to match, so discord.py does not chunk), heartbeat
  ACKs, RESUME (missed events replayed, then RESUMED), sequence numbers, zlib-stream
  compression when asked for, REQUEST_GUILD_MEMBERS -> GUILD_MEMBERS_CHUNK, close codes
  4001-4014. MESSAGE_CREATE/UPDATE/DELETE go to sessions with the GUILD_MESSAGES intent;
  message content of other authors is blanked without MESSAGE_CONTENT.

Quirks it copies: the first followup after a defer edits the deferred message and keeps
its ephemeral flag; a normal close (1000/1001) by the client ends its session, any other
drop leaves it resumable; embeds are dropped without Embed Links; uploads are renamed
(spaces to ``_``) and typed from the file name.

What Discord does that this does not: no DMs or user-installed contexts, threads,
reactions, voice, presences, audit log, webhooks other than interaction ones, or OAuth2;
one application and bot user; no ETF or zstd encoding (a zstd client gets plain text
frames, which discord.py reads); no heartbeat timeout on the server side; permission
overwrites are applied, but role hierarchy, timeouts and thread permissions are not;
``default_member_permissions`` is not enforced (as if the guild overrode it); global
commands apply at once; bucket sizes are guesses (Discord's vary and are undocumented);
the invalid request counter never bans; message types of interaction followups are
approximate; ``attachment://`` images stay in ``attachments`` besides the embed; the 30046
edit limit on old messages is only a fault (``fail_next(..., status=400,
code=ErrorCode.OLD_MESSAGE_EDIT_LIMIT)``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import itertools
import json
import logging
import math
import mimetypes
import re
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, IntFlag
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

log = logging.getLogger(__name__)

JSON = dict[str, Any]

API_VERSION = 10
# Discord's snowflake epoch (2015-01-01T00:00:00Z) in milliseconds.
DISCORD_EPOCH_MS = 1420070400000
# The default upload limit per file since 2025-01 (interactions say so in
# attachment_size_limit).
ATTACHMENT_SIZE_LIMIT = 10 * 2**20
# What Discord answers in HELLO.
HEARTBEAT_INTERVAL = 41.25
# A bucket that discord.py learns but a test never reaches: (requests, per seconds).
DEFAULT_ROUTE_LIMIT = (50, 1.0)
# Per-route limits as Discord is seen to send them; it documents none of them.
TYPICAL_ROUTE_LIMITS: dict[str, tuple[int, float]] = {
    "POST /channels/{channel_id}/messages": (5, 5.0),
    "PATCH /channels/{channel_id}/messages/{message_id}": (5, 5.0),
    "DELETE /channels/{channel_id}/messages/{message_id}": (5, 1.0),
    "POST /webhooks/{webhook_id}/{webhook_token}": (5, 2.0),
    "PATCH /webhooks/{webhook_id}/{webhook_token}/messages/@original": (5, 2.0),
    "PATCH /webhooks/{webhook_id}/{webhook_token}/messages/{message_id}": (5, 2.0),
    "PUT /applications/{application_id}/commands": (2, 60.0),
    "PUT /applications/{application_id}/guilds/{guild_id}/commands": (2, 60.0),
}
# Requests per second a bot token may make across routes (interaction routes exempt).
GLOBAL_RATE_LIMIT = 50
# Gateway sends a client may make per minute before Discord closes with 4008.
GATEWAY_SEND_LIMIT = 120
# How long Discord's CDN signs attachment URLs for (the ``ex`` parameter).
CDN_URL_TTL = 24 * 3600.0
_RATE_LIMIT_MESSAGE = "You are being rate limited."
_ROW_COMPONENT_TYPES = {2, 3, 4, 5, 6, 7, 8}
_SELECT_TYPES = {3, 5, 6, 7, 8}


class Permission(IntFlag):
    """Permission bits that the emulator computes with or tests commonly set."""

    CREATE_INSTANT_INVITE = 1 << 0
    KICK_MEMBERS = 1 << 1
    BAN_MEMBERS = 1 << 2
    ADMINISTRATOR = 1 << 3
    MANAGE_CHANNELS = 1 << 4
    MANAGE_GUILD = 1 << 5
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    MENTION_EVERYONE = 1 << 17
    USE_EXTERNAL_EMOJIS = 1 << 18
    CONNECT = 1 << 20
    SPEAK = 1 << 21
    CHANGE_NICKNAME = 1 << 26
    MANAGE_ROLES = 1 << 28
    USE_APPLICATION_COMMANDS = 1 << 31
    SEND_MESSAGES_IN_THREADS = 1 << 38
    USE_EXTERNAL_APPS = 1 << 50


# Every permission Discord defines (bits 0-52 but 47): what owners and administrators get.
ALL_PERMISSIONS = 8866461766385663
DEFAULT_EVERYONE_PERMISSIONS = int(
    Permission.CREATE_INSTANT_INVITE
    | Permission.ADD_REACTIONS
    | Permission.VIEW_CHANNEL
    | Permission.SEND_MESSAGES
    | Permission.EMBED_LINKS
    | Permission.ATTACH_FILES
    | Permission.READ_MESSAGE_HISTORY
    | Permission.MENTION_EVERYONE
    | Permission.USE_EXTERNAL_EMOJIS
    | Permission.CONNECT
    | Permission.SPEAK
    | Permission.CHANGE_NICKNAME
    | Permission.USE_APPLICATION_COMMANDS
    | Permission.SEND_MESSAGES_IN_THREADS
    | Permission.USE_EXTERNAL_APPS
)
# What an invite link with the usual bot scopes grants the bot's managed role.
DEFAULT_BOT_PERMISSIONS = int(
    Permission.VIEW_CHANNEL
    | Permission.SEND_MESSAGES
    | Permission.EMBED_LINKS
    | Permission.ATTACH_FILES
    | Permission.READ_MESSAGE_HISTORY
    | Permission.ADD_REACTIONS
    | Permission.USE_EXTERNAL_EMOJIS
    | Permission.USE_APPLICATION_COMMANDS
    | Permission.SEND_MESSAGES_IN_THREADS
)


class Intent(IntFlag):
    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_PRESENCES = 1 << 8
    GUILD_MESSAGES = 1 << 9
    DIRECT_MESSAGES = 1 << 12
    MESSAGE_CONTENT = 1 << 15


PRIVILEGED_INTENTS = int(Intent.GUILD_MEMBERS | Intent.GUILD_PRESENCES | Intent.MESSAGE_CONTENT)


class MessageFlag(IntFlag):
    SUPPRESS_EMBEDS = 1 << 2
    EPHEMERAL = 1 << 6
    LOADING = 1 << 7
    SUPPRESS_NOTIFICATIONS = 1 << 12
    IS_COMPONENTS_V2 = 1 << 15


class InteractionType(IntEnum):
    PING = 1
    APPLICATION_COMMAND = 2
    MESSAGE_COMPONENT = 3
    APPLICATION_COMMAND_AUTOCOMPLETE = 4
    MODAL_SUBMIT = 5


class CallbackType(IntEnum):
    PONG = 1
    CHANNEL_MESSAGE_WITH_SOURCE = 4
    DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE = 5
    DEFERRED_UPDATE_MESSAGE = 6
    UPDATE_MESSAGE = 7
    APPLICATION_COMMAND_AUTOCOMPLETE_RESULT = 8
    MODAL = 9


class OptionType(IntEnum):
    SUB_COMMAND = 1
    SUB_COMMAND_GROUP = 2
    STRING = 3
    INTEGER = 4
    BOOLEAN = 5
    USER = 6
    CHANNEL = 7
    ROLE = 8
    MENTIONABLE = 9
    NUMBER = 10
    ATTACHMENT = 11


class ErrorCode(IntEnum):
    """Discord's JSON error codes, with the messages it sends beside them (``MESSAGES``)."""

    GENERAL = 0
    UNKNOWN_CHANNEL = 10003
    UNKNOWN_GUILD = 10004
    UNKNOWN_MEMBER = 10007
    UNKNOWN_MESSAGE = 10008
    UNKNOWN_USER = 10013
    UNKNOWN_WEBHOOK = 10015
    UNKNOWN_INTERACTION = 10062
    UNKNOWN_APPLICATION_COMMAND = 10063
    MAX_APPLICATION_COMMANDS = 30032
    OLD_MESSAGE_EDIT_LIMIT = 30046
    REQUEST_ENTITY_TOO_LARGE = 40005
    ALREADY_ACKNOWLEDGED = 40060
    MISSING_ACCESS = 50001
    CANNOT_EDIT_OTHERS_MESSAGE = 50005
    EMPTY_MESSAGE = 50006
    MISSING_PERMISSIONS = 50013
    INVALID_WEBHOOK_TOKEN = 50027
    INVALID_FORM_BODY = 50035
    INVALID_JSON = 50109


MESSAGES: dict[int, str] = {
    ErrorCode.UNKNOWN_CHANNEL: "Unknown Channel",
    ErrorCode.UNKNOWN_GUILD: "Unknown Guild",
    ErrorCode.UNKNOWN_MEMBER: "Unknown Member",
    ErrorCode.UNKNOWN_MESSAGE: "Unknown Message",
    ErrorCode.UNKNOWN_USER: "Unknown User",
    ErrorCode.UNKNOWN_WEBHOOK: "Unknown Webhook",
    ErrorCode.UNKNOWN_INTERACTION: "Unknown interaction",
    ErrorCode.UNKNOWN_APPLICATION_COMMAND: "Unknown application command",
    ErrorCode.MAX_APPLICATION_COMMANDS: "Maximum number of application commands reached (100)",
    ErrorCode.OLD_MESSAGE_EDIT_LIMIT: (
        "Maximum number of edits to messages older than 1 hour reached. Try again later"
    ),
    ErrorCode.REQUEST_ENTITY_TOO_LARGE: "Request entity too large",
    ErrorCode.ALREADY_ACKNOWLEDGED: "Interaction has already been acknowledged.",
    ErrorCode.MISSING_ACCESS: "Missing Access",
    ErrorCode.CANNOT_EDIT_OTHERS_MESSAGE: "Cannot edit a message authored by another user",
    ErrorCode.EMPTY_MESSAGE: "Cannot send an empty message",
    ErrorCode.MISSING_PERMISSIONS: "Missing Permissions",
    ErrorCode.INVALID_WEBHOOK_TOKEN: "Invalid Webhook Token",
    ErrorCode.INVALID_FORM_BODY: "Invalid Form Body",
    ErrorCode.INVALID_JSON: "The request body contains invalid JSON.",
}


class GatewayOp(IntEnum):
    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    PRESENCE_UPDATE = 3
    VOICE_STATE_UPDATE = 4
    RESUME = 6
    RECONNECT = 7
    REQUEST_GUILD_MEMBERS = 8
    INVALID_SESSION = 9
    HELLO = 10
    HEARTBEAT_ACK = 11


class CloseCode(IntEnum):
    UNKNOWN_ERROR = 4000
    UNKNOWN_OPCODE = 4001
    DECODE_ERROR = 4002
    NOT_AUTHENTICATED = 4003
    AUTHENTICATION_FAILED = 4004
    ALREADY_AUTHENTICATED = 4005
    INVALID_SEQ = 4007
    RATE_LIMITED = 4008
    SESSION_TIMED_OUT = 4009
    INVALID_SHARD = 4010
    INVALID_API_VERSION = 4012
    INVALID_INTENTS = 4013
    DISALLOWED_INTENTS = 4014


# -- small helpers ---------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def _now() -> datetime:
    return datetime.now(UTC)


def snowflake_time(snowflake: int) -> datetime:
    """When a snowflake was made."""
    return datetime.fromtimestamp(((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000, UTC)


class _Snowflakes:
    """Unique, increasing snowflakes: the current millisecond, worker 1, process 1."""

    def __init__(self) -> None:
        self._last_ms = 0
        self._increment = 0

    def __call__(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        if ms <= self._last_ms:
            self._increment += 1
            if self._increment >= 4096:
                self._last_ms += 1
                self._increment = 0
            ms = self._last_ms
        else:
            self._last_ms = ms
            self._increment = 0
        return (ms << 22) | (1 << 17) | (1 << 12) | self._increment


def _bucket_hash(key: str) -> str:
    return hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()


class _FormErrors:
    """Discord's nested ``errors`` object of a 50035 answer, built path by path."""

    def __init__(self) -> None:
        self.tree: JSON = {}

    def add(self, path: Sequence[str | int], code: str, message: str) -> None:
        node = self.tree
        for key in path:
            node = node.setdefault(str(key), {})
        node.setdefault("_errors", []).append({"code": code, "message": message})

    def __bool__(self) -> bool:
        return bool(self.tree)

    def length(self, path: Sequence[str | int], value: Any, low: int, high: int) -> None:
        """A string of ``low`` to ``high`` characters, as Discord words its complaint."""
        if not isinstance(value, str):
            self.add(path, "BASE_TYPE_REQUIRED", "This field is required")
        elif not low <= len(value) <= high:
            if low == 0:
                self.add(path, "BASE_TYPE_MAX_LENGTH", f"Must be {high} or fewer in length.")
            else:
                message = f"Must be between {low} and {high} in length."
                self.add(path, "BASE_TYPE_BAD_LENGTH", message)

    def at_most(self, path: Sequence[str | int], items: Sequence[Any], high: int) -> None:
        if len(items) > high:
            self.add(path, "BASE_TYPE_MAX_LENGTH", f"Must be {high} or fewer in length.")


class ApiError(Exception):
    """An error answer: ``status`` and Discord's JSON body."""

    def __init__(self, status: int, body: JSON, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, status: int, code: ErrorCode, message: str | None = None) -> ApiError:
        return cls(status, {"message": message or MESSAGES[code], "code": int(code)})

    @classmethod
    def form(cls, errors: _FormErrors) -> ApiError:
        body = {
            "message": MESSAGES[ErrorCode.INVALID_FORM_BODY],
            "code": int(ErrorCode.INVALID_FORM_BODY),
            "errors": errors.tree,
        }
        return cls(400, body)


# -- what tests read -------------------------------------------------------------------


@dataclass
class Upload:
    """One file part of a multipart request, as sent."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(eq=False)
class Call:
    """One request: a REST call, or a payload a client sent over the gateway.

    ``route`` is discord.py's template (``/channels/{channel_id}/messages/{message_id}``)
    and ``path`` the concrete path, both without ``/api/v10``; gateway sends have
    ``method == "GATEWAY"``, the op's name as ``route`` and the socket's path as
    ``path``. ``json`` is the JSON body (``payload_json`` of a multipart one), ``time``
    is ``time.monotonic()`` when it arrived, ``status`` and ``response`` what was
    answered.
    """

    method: str
    route: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    json: Any
    files: list[Upload]
    headers: dict[str, str]
    time: float
    status: int = 0
    response: Any = None

    @property
    def key(self) -> str:
        return f"{self.method} {self.route}"


@dataclass(eq=False)
class User:
    id: int
    username: str
    global_name: str | None = None
    bot: bool = False
    avatar: str | None = None

    def to_json(self) -> JSON:
        data: JSON = {
            "id": str(self.id),
            "username": self.username,
            "avatar": self.avatar,
            "discriminator": f"{self.id % 10000:04d}" if self.bot else "0",
            "public_flags": 0,
            "flags": 0,
            "banner": None,
            "accent_color": None,
            "global_name": self.global_name,
            "avatar_decoration_data": None,
            "collectibles": None,
            "banner_color": None,
            "clan": None,
            "primary_guild": None,
        }
        if self.bot:
            data["bot"] = True
        return data

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"


@dataclass(eq=False)
class Role:
    id: int
    name: str
    permissions: int
    position: int = 0
    color: int = 0
    hoist: bool = False
    managed: bool = False
    mentionable: bool = False
    bot_id: int | None = None

    def to_json(self) -> JSON:
        data: JSON = {
            "id": str(self.id),
            "name": self.name,
            "description": None,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": self.color,
            "colors": {
                "primary_color": self.color,
                "secondary_color": None,
                "tertiary_color": None,
            },
            "hoist": self.hoist,
            "managed": self.managed,
            "mentionable": self.mentionable,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }
        if self.bot_id is not None:
            data["tags"] = {"bot_id": str(self.bot_id)}
        return data


@dataclass(frozen=True)
class Overwrite:
    """A channel permission overwrite: ``type`` 0 for a role, 1 for a member."""

    id: int
    type: int
    allow: int = 0
    deny: int = 0

    def to_json(self) -> JSON:
        return {
            "id": str(self.id),
            "type": self.type,
            "allow": str(self.allow),
            "deny": str(self.deny),
        }


@dataclass(eq=False)
class Channel:
    id: int
    guild_id: int
    name: str
    type: int = 0
    position: int = 0
    nsfw: bool = False
    topic: str | None = None
    parent_id: int | None = None
    overwrites: list[Overwrite] = field(default_factory=list)
    rate_limit_per_user: int = 0
    last_message_id: int | None = None

    def to_json(self) -> JSON:
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": [o.to_json() for o in self.overwrites],
            "parent_id": None if self.parent_id is None else str(self.parent_id),
            "nsfw": self.nsfw,
            "topic": self.topic,
            "last_message_id": None if self.last_message_id is None else str(self.last_message_id),
            "rate_limit_per_user": self.rate_limit_per_user,
            "flags": 0,
            "icon_emoji": None,
            "theme_color": None,
        }

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"


@dataclass(eq=False)
class Member:
    user: User
    roles: list[int] = field(default_factory=list)
    nick: str | None = None
    joined_at: datetime = field(default_factory=_now)

    def to_json(self) -> JSON:
        return {
            "user": self.user.to_json(),
            "roles": [str(r) for r in self.roles],
            "nick": self.nick,
            "avatar": None,
            "banner": None,
            "joined_at": _iso(self.joined_at),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }


@dataclass(eq=False)
class Guild:
    """A guild the bot is in. ``channels``, ``roles`` and ``members`` are keyed by id;
    the ``@everyone`` role has the guild's id."""

    id: int
    name: str
    owner_id: int
    roles: dict[int, Role] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    members: dict[int, Member] = field(default_factory=dict)
    preferred_locale: str = "en-US"
    features: list[str] = field(default_factory=list)
    attachment_size_limit: int | None = None
    _ids: Callable[[], int] = field(default=lambda: 0, repr=False)
    # How the emulator tells connected bots of a change: (event, data, intent).
    _announce: Callable[[str, JSON, int], None] = field(default=lambda *_: None, repr=False)

    @property
    def everyone(self) -> Role:
        return self.roles[self.id]

    def channel(self, name_or_id: str | int) -> Channel:
        """The channel with this id, or the first with this name."""
        if isinstance(name_or_id, int):
            return self.channels[name_or_id]
        for channel in self.channels.values():
            if channel.name == name_or_id:
                return channel
        raise KeyError(name_or_id)

    @property
    def text_channel(self) -> Channel:
        """The first text channel."""
        return next(c for c in self.channels.values() if c.type == 0)

    def role(self, name_or_id: str | int) -> Role:
        if isinstance(name_or_id, int):
            return self.roles[name_or_id]
        for role in self.roles.values():
            if role.name == name_or_id:
                return role
        raise KeyError(name_or_id)

    def add_channel(
        self,
        name: str,
        *,
        type: int = 0,
        nsfw: bool = False,
        topic: str | None = None,
        overwrites: Sequence[Overwrite] = (),
    ) -> Channel:
        channel = Channel(
            id=self._ids(),
            guild_id=self.id,
            name=name,
            type=type,
            position=len(self.channels),
            nsfw=nsfw,
            topic=topic,
            overwrites=list(overwrites),
        )
        self.channels[channel.id] = channel
        self._announce("CHANNEL_CREATE", channel.to_json(), Intent.GUILDS)
        return channel

    def update_channel(self, channel: Channel, **changes: Any) -> None:
        """Change a channel's fields (``nsfw=True``, ``overwrites=[...]``) as a moderator
        would; connected bots get CHANNEL_UPDATE."""
        for key, value in changes.items():
            if not hasattr(channel, key):
                raise AttributeError(key)
            setattr(channel, key, value)
        self._announce("CHANNEL_UPDATE", channel.to_json(), Intent.GUILDS)

    def add_role(self, name: str, permissions: int = 0) -> Role:
        role = Role(id=self._ids(), name=name, permissions=permissions, position=len(self.roles))
        self.roles[role.id] = role
        data = {"guild_id": str(self.id), "role": role.to_json()}
        self._announce("GUILD_ROLE_CREATE", data, Intent.GUILDS)
        return role

    def add_member(self, user: User, roles: Sequence[Role | int] = ()) -> Member:
        ids = [r.id if isinstance(r, Role) else r for r in roles]
        member = Member(user=user, roles=ids)
        self.members[user.id] = member
        data = member.to_json()
        data["guild_id"] = str(self.id)
        self._announce("GUILD_MEMBER_ADD", data, Intent.GUILD_MEMBERS)
        return member

    def base_permissions(self, user_id: int) -> int:
        """Guild-wide permissions of a member: owner and administrators get all."""
        if user_id == self.owner_id:
            return ALL_PERMISSIONS
        member = self.members.get(user_id)
        permissions = self.everyone.permissions
        for role_id in member.roles if member else []:
            role = self.roles.get(role_id)
            if role is not None:
                permissions |= role.permissions
        if permissions & Permission.ADMINISTRATOR:
            return ALL_PERMISSIONS
        return permissions

    def permissions_in(self, channel: Channel, user_id: int) -> int:
        """Discord's overwrite algorithm: @everyone, then roles, then the member."""
        permissions = self.base_permissions(user_id)
        if permissions == ALL_PERMISSIONS:
            return permissions
        overwrites = {o.id: o for o in channel.overwrites}
        everyone = overwrites.get(self.id)
        if everyone is not None:
            permissions = (permissions & ~everyone.deny) | everyone.allow
        member = self.members.get(user_id)
        allow = deny = 0
        for role_id in member.roles if member else []:
            overwrite = overwrites.get(role_id)
            if overwrite is not None and overwrite.type == 0:
                allow |= overwrite.allow
                deny |= overwrite.deny
        permissions = (permissions & ~deny) | allow
        own = overwrites.get(user_id)
        if own is not None and own.type == 1:
            permissions = (permissions & ~own.deny) | own.allow
        if not permissions & Permission.VIEW_CHANNEL:
            return 0
        return permissions

    def to_json(self, *, counts: bool = False) -> JSON:
        data: JSON = {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "description": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "owner_id": str(self.owner_id),
            "application_id": None,
            "region": "deprecated",
            "afk_channel_id": None,
            "afk_timeout": 300,
            "system_channel_id": str(self.text_channel.id) if self.channels else None,
            "system_channel_flags": 0,
            "widget_enabled": False,
            "widget_channel_id": None,
            "verification_level": 0,
            "roles": [r.to_json() for r in self.roles.values()],
            "default_message_notifications": 0,
            "mfa_level": 0,
            "explicit_content_filter": 0,
            "max_presences": None,
            "max_members": 500000,
            "max_stage_video_channel_users": 50,
            "max_video_channel_users": 25,
            "vanity_url_code": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": self.preferred_locale,
            "rules_channel_id": None,
            "safety_alerts_channel_id": None,
            "public_updates_channel_id": None,
            "hub_type": None,
            "premium_progress_bar_enabled": False,
            "nsfw": False,
            "nsfw_level": 0,
            "emojis": [],
            "stickers": [],
            "features": list(self.features),
            "incidents_data": None,
            "inventory_settings": None,
            "embed_enabled": False,
            "embed_channel_id": None,
        }
        if counts:
            data["approximate_member_count"] = len(self.members)
            data["approximate_presence_count"] = 0
        return data


@dataclass(eq=False)
class Attachment:
    """A file stored on the emulated CDN: its bytes and the signed URL that serves them."""

    id: int
    filename: str
    size: int
    content_type: str | None
    data: bytes
    url: str
    proxy_url: str
    expires: float
    width: int | None = None
    height: int | None = None
    description: str | None = None
    ephemeral: bool = False
    title: str | None = None

    def to_json(self) -> JSON:
        data: JSON = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.proxy_url,
        }
        if self.title is not None:
            data["title"] = self.title
        if self.description is not None:
            data["description"] = self.description
        if self.content_type is not None:
            data["content_type"] = self.content_type
        if self.width is not None and self.height is not None:
            data["width"] = self.width
            data["height"] = self.height
            data["placeholder_version"] = 1
        if self.ephemeral:
            data["ephemeral"] = True
        return data

    def image(self) -> Image.Image:
        """The bytes opened with Pillow (loaded, so the buffer can go)."""
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image


@dataclass(eq=False)
class Edit:
    """One change to a message: ``via`` is ``"bot"`` (PATCH with the bot token),
    ``"webhook"`` (an interaction token route) or ``"component"`` (an UPDATE_MESSAGE
    callback); ``changes`` is the body sent, ``content`` the content after it."""

    time: float
    via: str
    changes: JSON
    content: str
    files: list[Upload]
    call: Call | None


@dataclass(eq=False)
class Message:
    id: int
    channel_id: int
    guild_id: int | None
    author: User
    content: str = ""
    embeds: list[JSON] = field(default_factory=list)
    components: list[JSON] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    flags: int = 0
    type: int = 0
    tts: bool = False
    webhook_id: int | None = None
    application_id: int | None = None
    interaction_metadata: JSON | None = None
    message_reference: JSON | None = None
    nonce: str | int | None = None
    poll: JSON | None = None
    timestamp: datetime = field(default_factory=_now)
    edited_timestamp: datetime | None = None
    created: float = field(default_factory=time.monotonic)
    edits: list[Edit] = field(default_factory=list)
    deleted: bool = False
    deleted_at: float | None = None

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & MessageFlag.EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & MessageFlag.LOADING)

    def custom_ids(self) -> list[str]:
        """Every component custom_id, in order."""
        return [c["custom_id"] for c in _walk_components(self.components) if "custom_id" in c]

    def component(self, custom_id: str) -> JSON:
        for component in _walk_components(self.components):
            if component.get("custom_id") == custom_id:
                return component
        raise KeyError(custom_id)

    def attachment(self, filename: str) -> Attachment:
        for attachment in self.attachments:
            if attachment.filename == filename:
                return attachment
        raise KeyError(filename)

    def to_json(self, *, gateway_member: Member | None = None) -> JSON:
        data: JSON = {
            "type": self.type,
            "content": self.content,
            "mentions": [],
            "mention_roles": [],
            "attachments": [a.to_json() for a in self.attachments],
            "embeds": [dict(e) for e in self.embeds],
            "timestamp": _iso(self.timestamp),
            "edited_timestamp": _iso(self.edited_timestamp) if self.edited_timestamp else None,
            "flags": self.flags,
            "components": self.components,
            "id": str(self.id),
            "channel_id": str(self.channel_id),
            "author": self.author.to_json(),
            "pinned": False,
            "mention_everyone": False,
            "tts": self.tts,
        }
        if self.webhook_id is not None:
            data["webhook_id"] = str(self.webhook_id)
        if self.application_id is not None:
            data["application_id"] = str(self.application_id)
        if self.interaction_metadata is not None:
            data["interaction_metadata"] = self.interaction_metadata
        if self.message_reference is not None:
            data["message_reference"] = self.message_reference
        if self.nonce is not None:
            data["nonce"] = self.nonce
        if self.poll is not None:
            data["poll"] = self.poll
        if gateway_member is not None and self.guild_id is not None:
            data["guild_id"] = str(self.guild_id)
            member = gateway_member.to_json()
            del member["user"]
            data["member"] = member
        return data


@dataclass(eq=False)
class Interaction:
    """An interaction the emulator dispatched, and what the bot did with it.

    ``callbacks`` holds every callback request (accepted or not), ``response`` the
    accepted one; ``original`` is the message the response made or updated (for
    components after type 6 or 7, the message the component is on), ``followups`` the
    messages sent through the token. ``created_at`` is ``time.monotonic()`` at dispatch.
    """

    id: int
    token: str
    type: int
    payload: JSON
    guild_id: int | None
    channel_id: int
    user_id: int
    created_at: float
    message: Message | None = None
    callbacks: list[Call] = field(default_factory=list)
    response: Call | None = None
    original: Message | None = None
    followups: list[Message] = field(default_factory=list)
    expired: bool = False
    _responded: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def response_type(self) -> int | None:
        return None if self.response is None else int(self.response.json["type"])

    @property
    def response_data(self) -> JSON:
        """The ``data`` of the accepted callback (``{}`` before one, or without data)."""
        if self.response is None:
            return {}
        data = self.response.json.get("data")
        return data if isinstance(data, dict) else {}

    @property
    def response_seconds(self) -> float | None:
        """Seconds from dispatch to the accepted callback."""
        return None if self.response is None else self.response.time - self.created_at

    @property
    def choices(self) -> list[JSON]:
        """The choices of an autocomplete answer (type 8)."""
        return list(self.response_data.get("choices", []))

    def responded_within(self, seconds: float = 3.0) -> bool:
        elapsed = self.response_seconds
        return elapsed is not None and elapsed <= seconds

    def deferred_within(self, seconds: float = 3.0) -> bool:
        """Whether the accepted callback was a defer (type 5 or 6) within ``seconds``."""
        deferred = (
            CallbackType.DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE,
            CallbackType.DEFERRED_UPDATE_MESSAGE,
        )
        return self.response_type in deferred and self.responded_within(seconds)

    async def wait_response(self, timeout: float = 3.5) -> Call:
        """The accepted callback, once it has come; ``TimeoutError`` after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._responded.wait()
        except TimeoutError:
            raise TimeoutError(
                f"interaction {self.id} got no accepted callback in {timeout} s "
                f"({len(self.callbacks)} rejected)"
            ) from None
        assert self.response is not None
        return self.response

    def expire(self) -> None:
        """End the token now: callbacks answer 10062, webhook routes 401 / 50027."""
        self.expired = True


# -- the gateway -----------------------------------------------------------------------


@dataclass(eq=False)
class GatewayConnection:
    """One WebSocket a client opened: ``path`` (``/gateway`` or the ``/resume`` of
    ``resume_gateway_url``), its query, what it did (``identified``, ``resumed``) and how
    it ended (``close_code``; ``None`` while open or after a cut)."""

    path: str
    query: dict[str, str]
    opened_at: float
    ws: web.WebSocketResponse = field(repr=False)
    transport: asyncio.Transport | None = field(repr=False)
    compress: bool = False
    session: GatewaySession | None = None
    identified: bool = False
    resumed: bool = False
    closed: bool = False
    close_code: int | None = None
    sent: int = 0
    sends: list[float] = field(default_factory=list, repr=False)
    _compressor: Any = field(default=None, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _writer: asyncio.Task[None] | None = field(default=None, repr=False)

    async def send(self, payload: JSON) -> bool:
        text = json.dumps(payload, separators=(",", ":"))
        async with self._lock:
            if self.closed or self.ws.closed:
                return False
            try:
                if self._compressor is not None:
                    data = self._compressor.compress(text.encode())
                    data += self._compressor.flush(zlib.Z_SYNC_FLUSH)
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_str(text)
            except (ConnectionError, RuntimeError) as error:
                log.debug("gateway send failed: %s", error)
                return False
        return True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass(eq=False)
class GatewaySession:
    """A session made by IDENTIFY; it outlives its socket until a client closes it with
    1000/1001 or it is invalidated. ``events`` are the dispatches sent, in sequence."""

    id: str
    intents: int
    shard: tuple[int, int] | None
    events: list[JSON] = field(default_factory=list)
    connection: GatewayConnection | None = None
    invalidated: bool = False
    _more: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def seq(self) -> int:
        return len(self.events)

    def push(self, event: str, data: JSON) -> int:
        seq = len(self.events) + 1
        self.events.append({"op": GatewayOp.DISPATCH, "t": event, "s": seq, "d": data})
        self._more.set()
        return seq

    def has_guild(self, guild_id: int) -> bool:
        if self.shard is None:
            return True
        shard_id, count = self.shard
        return (guild_id >> 22) % count == shard_id


# -- routes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    method: str
    template: str
    handler: str
    auth: str  # "bot", "token" (interaction token in the path) or "none"
    pattern: re.Pattern[str]


def _route(method: str, template: str, handler: str, auth: str = "bot") -> _Route:
    regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    return _Route(method, template, handler, auth, re.compile(f"^{regex}$"))


_COMMANDS = "/applications/{application_id}/commands"
_GUILD_COMMANDS = "/applications/{application_id}/guilds/{guild_id}/commands"
_WEBHOOK = "/webhooks/{webhook_id}/{webhook_token}"
_MESSAGES = "/channels/{channel_id}/messages"

# In match order: literal segments (@me, @original) before placeholders.
ROUTES: tuple[_Route, ...] = (
    _route("GET", "/gateway", "_get_gateway", "none"),
    _route("GET", "/gateway/bot", "_get_gateway_bot"),
    _route("GET", "/users/@me", "_get_me"),
    _route("GET", "/users/{user_id}", "_get_user"),
    _route("GET", "/oauth2/applications/@me", "_get_application"),
    _route("GET", "/applications/@me", "_get_application"),
    _route("GET", _COMMANDS, "_get_commands"),
    _route("PUT", _COMMANDS, "_put_commands"),
    _route("POST", _COMMANDS, "_post_command"),
    _route("GET", _COMMANDS + "/{command_id}", "_get_command"),
    _route("PATCH", _COMMANDS + "/{command_id}", "_patch_command"),
    _route("DELETE", _COMMANDS + "/{command_id}", "_delete_command"),
    _route("GET", _GUILD_COMMANDS, "_get_commands"),
    _route("PUT", _GUILD_COMMANDS, "_put_commands"),
    _route("POST", _GUILD_COMMANDS, "_post_command"),
    _route("GET", _GUILD_COMMANDS + "/{command_id}", "_get_command"),
    _route("PATCH", _GUILD_COMMANDS + "/{command_id}", "_patch_command"),
    _route("DELETE", _GUILD_COMMANDS + "/{command_id}", "_delete_command"),
    _route("POST", "/interactions/{webhook_id}/{webhook_token}/callback", "_callback", "token"),
    _route("GET", _WEBHOOK + "/messages/@original", "_get_webhook_message", "token"),
    _route("PATCH", _WEBHOOK + "/messages/@original", "_patch_webhook_message", "token"),
    _route("DELETE", _WEBHOOK + "/messages/@original", "_delete_webhook_message", "token"),
    _route("POST", _WEBHOOK, "_post_followup", "token"),
    _route("GET", _WEBHOOK + "/messages/{message_id}", "_get_webhook_message", "token"),
    _route("PATCH", _WEBHOOK + "/messages/{message_id}", "_patch_webhook_message", "token"),
    _route("DELETE", _WEBHOOK + "/messages/{message_id}", "_delete_webhook_message", "token"),
    _route("GET", "/channels/{channel_id}", "_get_channel"),
    _route("GET", _MESSAGES, "_get_messages"),
    _route("POST", _MESSAGES, "_post_message"),
    _route("GET", _MESSAGES + "/{message_id}", "_get_message"),
    _route("PATCH", _MESSAGES + "/{message_id}", "_patch_message"),
    _route("DELETE", _MESSAGES + "/{message_id}", "_delete_message"),
    _route("POST", "/channels/{channel_id}/typing", "_post_typing"),
    _route("GET", "/guilds/{guild_id}", "_get_guild"),
    _route("GET", "/guilds/{guild_id}/channels", "_get_guild_channels"),
    _route("GET", "/guilds/{guild_id}/roles", "_get_guild_roles"),
    _route("GET", "/guilds/{guild_id}/members", "_get_members"),
    _route("GET", "/guilds/{guild_id}/members/{user_id}", "_get_member"),
)
_MAJOR_PARAMETERS = ("channel_id", "guild_id", "webhook_id", "webhook_token")


@dataclass
class _Reply:
    status: int
    body: Any = None


@dataclass
class _Fault:
    method: str | None
    pattern: str
    count: int
    status: int
    body: Any
    headers: dict[str, str]
    text: str | None = None


@dataclass
class _Bucket:
    limit: int
    window: float
    remaining: int = 0
    reset_at: float = 0.0


def _split_spec(spec: str) -> tuple[str | None, str]:
    """``"PATCH /channels/1"`` -> ``("PATCH", "/channels/1")``; no method -> ``None``."""
    head, _, tail = spec.partition(" ")
    if tail and head.isupper():
        return head, tail.strip()
    return None, spec.strip()


def _spec_matches(spec: str, method: str, template: str, path: str, *, prefix: bool) -> bool:
    want_method, pattern = _split_spec(spec)
    if want_method is not None and want_method != method:
        return False
    if pattern in (template, path):
        return True
    return prefix and "{" not in pattern and path.startswith(pattern)


# -- validation ------------------------------------------------------------------------


def _walk_components(components: Sequence[Any]) -> list[JSON]:
    """Every component, depth first (rows, containers, sections, labels, accessories)."""
    found: list[JSON] = []
    for component in components:
        if not isinstance(component, dict):
            continue
        found.append(component)
        found.extend(_walk_components(component.get("components") or []))
        for key in ("accessory", "component"):
            child = component.get(key)
            if isinstance(child, dict):
                found.extend(_walk_components([child]))
    return found


def _embed_length(embed: JSON) -> int:
    total = len(str(embed.get("title") or "")) + len(str(embed.get("description") or ""))
    for item in embed.get("fields") or []:
        total += len(str(item.get("name") or "")) + len(str(item.get("value") or ""))
    total += len(str((embed.get("footer") or {}).get("text") or ""))
    total += len(str((embed.get("author") or {}).get("name") or ""))
    return total


def _check_embeds(embeds: Any, errors: _FormErrors) -> None:
    if not isinstance(embeds, list):
        errors.add(("embeds",), "BASE_TYPE_ARRAY", "Must be an array.")
        return
    errors.at_most(("embeds",), embeds, 10)
    limits = (("title", 256), ("description", 4096))
    for index, embed in enumerate(embeds):
        if not isinstance(embed, dict):
            continue
        for key, high in limits:
            if embed.get(key) is not None:
                errors.length(("embeds", index, key), embed[key], 0, high)
        fields = embed.get("fields") or []
        errors.at_most(("embeds", index, "fields"), fields, 25)
        for number, item in enumerate(fields):
            errors.length(("embeds", index, "fields", number, "name"), item.get("name"), 1, 256)
            errors.length(("embeds", index, "fields", number, "value"), item.get("value"), 1, 1024)
        footer = embed.get("footer") or {}
        if footer.get("text") is not None:
            errors.length(("embeds", index, "footer", "text"), footer["text"], 0, 2048)
        author = embed.get("author") or {}
        if author.get("name") is not None:
            errors.length(("embeds", index, "author", "name"), author["name"], 0, 256)
    if sum(_embed_length(e) for e in embeds if isinstance(e, dict)) > 6000:
        errors.add(
            ("embeds",), "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000"
        )


def _check_custom_id(path: tuple[str | int, ...], component: JSON, errors: _FormErrors) -> None:
    errors.length((*path, "custom_id"), component.get("custom_id"), 1, 100)


def _check_button(path: tuple[str | int, ...], button: JSON, errors: _FormErrors) -> None:
    style = button.get("style")
    if style == 5:
        if not button.get("url"):
            errors.add((*path, "url"), "BASE_TYPE_REQUIRED", "This field is required")
        if "custom_id" in button:
            message = "A custom id cannot be set on a link button"
            errors.add((*path, "custom_id"), "BUTTON_COMPONENT_CUSTOM_ID_NOT_ALLOWED", message)
    elif style == 6:
        if not button.get("sku_id"):
            errors.add((*path, "sku_id"), "BASE_TYPE_REQUIRED", "This field is required")
    elif style in (1, 2, 3, 4):
        _check_custom_id(path, button, errors)
    else:
        errors.add(
            (*path, "style"), "BASE_TYPE_CHOICES", "Value must be one of {1, 2, 3, 4, 5, 6}."
        )
    if button.get("label") is not None:
        errors.length((*path, "label"), button["label"], 0, 80)


def _check_components(components: Any, flags: int, errors: _FormErrors) -> None:
    if not isinstance(components, list):
        errors.add(("components",), "BASE_TYPE_ARRAY", "Must be an array.")
        return
    if flags & MessageFlag.IS_COMPONENTS_V2:
        everything = _walk_components(components)
        errors.at_most(("components",), everything, 40)
        for index, component in enumerate(everything):
            if component.get("type") == 2:
                _check_button(("components", index), component, errors)
            elif component.get("type") in _SELECT_TYPES | {4}:
                _check_custom_id(("components", index), component, errors)
    else:
        errors.at_most(("components",), components, 5)
        for row_index, row in enumerate(components):
            path: tuple[str | int, ...] = ("components", row_index)
            if not isinstance(row, dict) or row.get("type") != 1:
                errors.add(
                    (*path, "type"), "UNION_TYPE_CHOICES", 'Value of field "type" must be 1.'
                )
                continue
            children = row.get("components") or []
            if not 1 <= len(children) <= 5:
                message = "Must be between 1 and 5 in length."
                errors.add((*path, "components"), "BASE_TYPE_BAD_LENGTH", message)
            selects = [c for c in children if c.get("type") in _SELECT_TYPES]
            if selects and len(children) > 1:
                message = "The specified component exceeds the maximum width"
                errors.add((*path, "components"), "COMPONENT_LAYOUT_WIDTH_EXCEEDED", message)
            for index, child in enumerate(children):
                child_path = (*path, "components", index)
                if child.get("type") == 2:
                    _check_button(child_path, child, errors)
                elif child.get("type") in _SELECT_TYPES:
                    _check_custom_id(child_path, child, errors)
                    errors.at_most((*child_path, "options"), child.get("options") or [], 25)
                else:
                    message = "Value must be one of {2, 3, 5, 6, 7, 8}."
                    errors.add((*child_path, "type"), "BASE_TYPE_CHOICES", message)
    seen: set[str] = set()
    for component in _walk_components(components):
        custom_id = component.get("custom_id")
        if isinstance(custom_id, str):
            if custom_id in seen:
                message = "Component custom id cannot be duplicated"
                errors.add(("components",), "COMPONENT_CUSTOM_ID_DUPLICATED", message)
            seen.add(custom_id)


def _number_components(components: list[JSON]) -> list[JSON]:
    """A copy with the numeric ``id`` Discord gives each component that has none."""
    copied: list[JSON] = json.loads(json.dumps(components))
    walked = _walk_components(copied)
    taken = {c["id"] for c in walked if isinstance(c.get("id"), int)}
    counter = itertools.count(1)
    for component in walked:
        if not isinstance(component.get("id"), int):
            number = next(counter)
            while number in taken:
                number = next(counter)
            component["id"] = number
    return copied


_NAME_RE = re.compile(r"^[-_'\w]{1,32}$")


def _check_name(
    path: tuple[str | int, ...], name: Any, errors: _FormErrors, *, slash: bool
) -> None:
    if not isinstance(name, str):
        errors.add((*path, "name"), "BASE_TYPE_REQUIRED", "This field is required")
        return
    if not 1 <= len(name) <= 32:
        errors.length((*path, "name"), name, 1, 32)
    elif slash and (not _NAME_RE.match(name) or name != name.lower()):
        message = "Command name is invalid"
        errors.add((*path, "name"), "APPLICATION_COMMAND_INVALID_NAME", message)


def _command_size(command: JSON) -> int:
    size = len(str(command.get("name") or "")) + len(str(command.get("description") or ""))
    for option in command.get("options") or []:
        size += _command_size(option)
        for choice in option.get("choices") or []:
            size += len(str(choice.get("name") or "")) + len(str(choice.get("value") or ""))
    return size


def _check_options(
    path: tuple[str | int, ...], options: Any, errors: _FormErrors, *, depth: int
) -> None:
    if options is None:
        return
    if not isinstance(options, list):
        errors.add((*path, "options"), "BASE_TYPE_ARRAY", "Must be an array.")
        return
    errors.at_most((*path, "options"), options, 25)
    names: set[str] = set()
    optional_seen = False
    for index, option in enumerate(options):
        where = (*path, "options", index)
        if not isinstance(option, dict):
            errors.add(where, "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")
            continue
        kind = option.get("type")
        if kind not in {int(t) for t in OptionType}:
            message = "Value must be one of {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}."
            errors.add((*where, "type"), "BASE_TYPE_CHOICES", message)
            continue
        _check_name(where, option.get("name"), errors, slash=True)
        errors.length((*where, "description"), option.get("description"), 1, 100)
        name = option.get("name")
        if isinstance(name, str):
            if name in names:
                message = "Option names must be unique"
                errors.add(
                    (*where, "name"), "APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS", message
                )
            names.add(name)
        if kind in (OptionType.SUB_COMMAND, OptionType.SUB_COMMAND_GROUP):
            if depth >= 2 or (depth == 1 and kind == OptionType.SUB_COMMAND_GROUP):
                message = "Sub-command groups can only contain sub-commands"
                errors.add((*where, "type"), "APPLICATION_COMMAND_OPTION_TYPE_INVALID", message)
            _check_options(where, option.get("options"), errors, depth=depth + 1)
            continue
        if option.get("required"):
            if optional_seen:
                message = "Required options must be placed before non-required options"
                errors.add(where, "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID", message)
        else:
            optional_seen = True
        choices = option.get("choices")
        if choices is not None:
            errors.at_most((*where, "choices"), choices, 25)
            for number, choice in enumerate(choices):
                errors.length((*where, "choices", number, "name"), choice.get("name"), 1, 100)
                if isinstance(choice.get("value"), str):
                    errors.length((*where, "choices", number, "value"), choice["value"], 1, 100)
            if option.get("autocomplete"):
                message = "Autocomplete cannot be set on an option with choices"
                errors.add(
                    (*where, "autocomplete"), "APPLICATION_COMMAND_AUTOCOMPLETE_INVALID", message
                )


def _check_command(path: tuple[str | int, ...], command: Any, errors: _FormErrors) -> None:
    if not isinstance(command, dict):
        errors.add(path, "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")
        return
    kind = command.get("type", 1)
    _check_name(path, command.get("name"), errors, slash=kind == 1)
    if kind == 1:
        errors.length((*path, "description"), command.get("description"), 1, 100)
        _check_options(path, command.get("options"), errors, depth=0)
    elif kind in (2, 3, 4):
        if command.get("description"):
            message = "Context menu commands cannot have description"
            errors.add(
                (*path, "description"), "APPLICATION_COMMAND_CONTEXT_MENU_DESCRIPTION", message
            )
    else:
        errors.add((*path, "type"), "BASE_TYPE_CHOICES", "Value must be one of {1, 2, 3, 4}.")
    if _command_size(command) > 4000:
        message = "Command exceeds maximum size (4000)"
        errors.add(path, "APPLICATION_COMMAND_TOO_LARGE", message)


def _clean_filename(name: str) -> str:
    """Discord's rename of uploads: path stripped, spaces and odd characters to ``_``."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^\w.\-]", "_", base) or "unknown"


def _image_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


# -- the emulator ----------------------------------------------------------------------


_Handler = Callable[[Call], Awaitable[_Reply]]


class DiscordEmulator:
    """Discord's REST API and gateway on a local port; see the module docstring.

    A bot test, with the fixtures of ``tests/fixtures/discord.py``::

        guild = emulator.add_guild()                          # #general, the bot in it
        admin = emulator.add_user(guild=guild, manage_guild=True)
        async with running(MyBot(guild_ready_timeout=0.05), emulator.token):
            emulator.rate_limit_next("PATCH /channels/{channel_id}/messages/{message_id}")
            interaction = await emulator.send_slash_command(
                guild.id, guild.text_channel.id, admin.id, "draw", {"prompt": "a fox"},
                attachments={"init": ("fox.png", png_bytes)},
            )
            await interaction.wait_response()
            assert interaction.deferred_within(3.0)
            await emulator.wait_for_call("PATCH /channels/{channel_id}/messages/{message_id}", 2)
            [card] = [m for m in emulator.messages_in(guild.text_channel.id) if m.attachments]
            click = await emulator.click_button(card, card.custom_ids()[0], admin.id)

    Test-facing state: ``calls`` (every REST call and gateway send, in order),
    ``guilds``, ``users``, ``messages`` (id -> ``Message``, deleted ones too),
    ``interactions`` (id -> ``Interaction``), ``commands`` (``None`` for global or a
    guild id -> the registered command JSON), ``sessions`` and ``connections`` (the
    gateway), ``invalid_requests``. Knobs that can change at any time:
    ``interaction_token_ttl``, ``interaction_response_window``, ``attachment_size_limit``,
    ``route_limits``, ``global_rate_limit``, ``heartbeat_interval``,
    ``allowed_intents``, ``cdn_url_ttl``.
    """

    def __init__(
        self,
        *,
        token: str = "test-token",
        application_id: int | None = None,
        bot_user_id: int | None = None,
        bot_name: str = "Brigade",
        interaction_token_ttl: float = 900.0,
        interaction_response_window: float = 3.0,
        attachment_size_limit: int = ATTACHMENT_SIZE_LIMIT,
        route_limits: Mapping[str, tuple[int, float]] | None = None,
        global_rate_limit: int | None = GLOBAL_RATE_LIMIT,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        allowed_intents: int = PRIVILEGED_INTENTS,
        cdn_url_ttl: float = CDN_URL_TTL,
    ) -> None:
        self._ids = _Snowflakes()
        self.token = token
        self.application_id = application_id or self._ids()
        self.bot_user = User(id=bot_user_id or self.application_id, username=bot_name, bot=True)
        self.owner = User(id=self._ids(), username="app-owner")
        self.interaction_token_ttl = interaction_token_ttl
        self.interaction_response_window = interaction_response_window
        self.attachment_size_limit = attachment_size_limit
        self.route_limits: dict[str, tuple[int, float]] = dict(route_limits or {})
        self.global_rate_limit = global_rate_limit
        self.heartbeat_interval = heartbeat_interval
        self.allowed_intents = allowed_intents
        self.cdn_url_ttl = cdn_url_ttl
        self.calls: list[Call] = []
        self.guilds: dict[int, Guild] = {}
        self.users: dict[int, User] = {self.bot_user.id: self.bot_user, self.owner.id: self.owner}
        self.messages: dict[int, Message] = {}
        self.interactions: dict[int, Interaction] = {}
        self.commands: dict[int | None, dict[int, JSON]] = {}
        self.sessions: list[GatewaySession] = []
        self.connections: list[GatewayConnection] = []
        self.invalid_requests = 0
        self.cdn: dict[int, Attachment] = {}
        #: Ids of the attachments downloaded from the CDN, in order.
        self.cdn_downloads: list[int] = []
        self.url = ""
        self.host = "127.0.0.1"
        self.port = 0
        self._secret = secrets.token_bytes(16)
        self._by_token: dict[str, Interaction] = {}
        self._faults: list[_Fault] = []
        self._buckets: dict[str, _Bucket] = {}
        self._global_window = (0.0, 0)
        self._waiters: list[asyncio.Future[None]] = []
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); return the base URL."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/api/{tail:.*}", self._api)
        for path in ("/gateway", "/resume", "/"):
            app.router.add_get(path, self._gateway)
        for prefix in ("", "/media"):
            for kind in ("attachments", "ephemeral-attachments"):
                app.router.add_get(f"{prefix}/{kind}/{{channel}}/{{id}}/{{name}}", self._cdn_get)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.host = host
        self.port = int(runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{url_host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        """Cut every gateway socket and stop listening."""
        runner, self._runner = self._runner, None
        for connection in self.connections:
            if not connection.closed:
                connection.abort()
        writers = [c._writer for c in self.connections if c._writer is not None]
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()

    @property
    def api_base(self) -> str:
        """What ``discord.http.Route.BASE`` must be."""
        return f"{self.url}/api/v{API_VERSION}"

    @property
    def gateway_url(self) -> str:
        """What ``DiscordWebSocket.DEFAULT_GATEWAY`` must be (as a ``yarl.URL``)."""
        return self.url.replace("http", "ws", 1) + "/gateway"

    @property
    def resume_gateway_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/resume"

    # -- waiting -----------------------------------------------------------------------

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
    ) -> None:
        """Wait until ``predicate()`` holds; it is checked after every change the
        emulator sees (a call, a gateway message, a message edit) and every 50 ms, for
        predicates on the client's side."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._waiters.append(waiter)
                    await asyncio.wait([waiter], timeout=0.05)
        except TimeoutError:
            raise TimeoutError(f"{what} did not happen within {timeout} s") from None

    def calls_to(self, spec: str) -> list[Call]:
        """Calls matching ``"[METHOD ]template-or-path"``, e.g.
        ``"PATCH /channels/{channel_id}/messages/{message_id}"`` or ``"/channels/1"``."""
        return [
            c
            for c in self.calls
            if _spec_matches(spec, c.method, c.route, c.path, prefix=False) and c.status
        ]

    async def wait_for_call(self, spec: str, count: int = 1, timeout: float = 5.0) -> list[Call]:
        """Wait until ``count`` calls match ``spec`` (see ``calls_to``) and were answered."""
        await self.wait_until(
            lambda: len(self.calls_to(spec)) >= count, timeout, f"{count} x {spec}"
        )
        return self.calls_to(spec)

    @property
    def gateway_calls(self) -> list[Call]:
        return [c for c in self.calls if c.method == "GATEWAY"]

    # -- the world ---------------------------------------------------------------------

    def add_user(
        self,
        user_id: int | None = None,
        *,
        username: str | None = None,
        global_name: str | None = None,
        bot: bool = False,
        guild: Guild | int | None = None,
        roles: Sequence[Role | int | str] = (),
        permissions: int | None = None,
        administrator: bool = False,
        manage_guild: bool = False,
    ) -> User:
        """A user; with ``guild``, a member of it with ``roles`` (objects, ids or names)
        and, where ``permissions``/``administrator``/``manage_guild`` are given, a role
        of their own that grants those bits."""
        user = User(
            id=user_id or self._ids(),
            username=username or f"user{len(self.users)}",
            global_name=global_name,
            bot=bot,
        )
        self.users[user.id] = user
        if guild is not None:
            target = guild if isinstance(guild, Guild) else self.guilds[guild]
            chosen = [r if isinstance(r, Role | int) else target.role(r) for r in roles]
            bits = permissions or 0
            bits |= Permission.ADMINISTRATOR if administrator else 0
            bits |= Permission.MANAGE_GUILD if manage_guild else 0
            if bits:
                chosen.append(target.add_role(f"{user.username}-role", int(bits)))
            target.add_member(user, chosen)
        return user

    def add_guild(
        self,
        guild_id: int | None = None,
        *,
        name: str = "Test Guild",
        owner_id: int | None = None,
        channels: Sequence[str] = ("general",),
        roles: Mapping[str, int] | None = None,
        members: Sequence[User | int] = (),
        everyone_permissions: int = DEFAULT_EVERYONE_PERMISSIONS,
        bot_permissions: int = DEFAULT_BOT_PERMISSIONS,
        preferred_locale: str = "en-US",
    ) -> Guild:
        """A guild the bot is in: text ``channels`` by name, ``roles`` (name ->
        permission bits), the owner (a new user unless ``owner_id``), the bot with a
        managed role of ``bot_permissions``, and ``members``. Connected sessions get a
        GUILD_CREATE, as when the bot joins."""
        gid = guild_id or self._ids()
        if owner_id is None:
            owner = self.add_user(username=f"owner{len(self.guilds)}")
        else:
            owner = self.users.get(owner_id) or self.add_user(owner_id)
        guild = Guild(
            id=gid,
            name=name,
            owner_id=owner.id,
            preferred_locale=preferred_locale,
            _ids=self._ids,
        )
        guild.roles[gid] = Role(id=gid, name="@everyone", permissions=everyone_permissions)
        bot_role = Role(
            id=self._ids(),
            name=self.bot_user.username,
            permissions=bot_permissions,
            position=1,
            managed=True,
            bot_id=self.bot_user.id,
        )
        guild.roles[bot_role.id] = bot_role
        for role_name, bits in (roles or {}).items():
            guild.add_role(role_name, bits)
        for channel_name in channels:
            guild.add_channel(channel_name)
        guild.add_member(owner)
        guild.add_member(self.bot_user, [bot_role])
        for entry in members:
            user = (
                entry if isinstance(entry, User) else self.users.get(entry) or self.add_user(entry)
            )
            self.users[user.id] = user
            guild.add_member(user)
        self.guilds[gid] = guild
        guild._announce = lambda event, data, intent: self._dispatch_guild(gid, event, data, intent)
        for session in self._live_sessions():
            if session.has_guild(gid):
                session.push("GUILD_CREATE", self._guild_create(guild, session))
        self._notify()
        return guild

    def upload(self, filename: str, data: bytes, content_type: str | None = None) -> Attachment:
        """A file a user attaches to a slash command (an option of type 11)."""
        return self._store_attachment(0, filename, data, content_type, ephemeral=True)

    def _store_attachment(
        self,
        channel_id: int,
        filename: str,
        data: bytes,
        content_type: str | None,
        *,
        ephemeral: bool = False,
        description: str | None = None,
    ) -> Attachment:
        if not self.url:
            raise RuntimeError("start the emulator before storing attachments")
        attachment_id = self._ids()
        name = _clean_filename(filename)
        guessed = mimetypes.guess_type(name)[0]
        if guessed is None and content_type and content_type != "application/octet-stream":
            guessed = content_type
        if guessed is not None and guessed.startswith("text/"):
            guessed += "; charset=utf-8"
        size = _image_size(data) if guessed and guessed.startswith("image/") else None
        kind = "ephemeral-attachments" if ephemeral else "attachments"
        path = f"/{kind}/{channel_id}/{attachment_id}/{name}"
        issued = int(time.time())
        expires = issued + int(self.cdn_url_ttl)
        query = f"?ex={expires:x}&is={issued:x}&hm={self._sign(path, expires, issued)}&"
        attachment = Attachment(
            id=attachment_id,
            filename=name,
            size=len(data),
            content_type=guessed,
            data=data,
            url=f"{self.url}{path}{query}",
            proxy_url=f"{self.url}/media{path}{query}",
            expires=float(expires),
            width=size[0] if size else None,
            height=size[1] if size else None,
            description=description,
            ephemeral=ephemeral,
        )
        self.cdn[attachment_id] = attachment
        return attachment

    def _sign(self, path: str, expires: int, issued: int) -> str:
        message = f"{path}:{expires:x}:{issued:x}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def expire_cdn_urls(self) -> None:
        """Make every attachment URL signed so far answer 404, as after its ``ex``."""
        for attachment in self.cdn.values():
            attachment.expires = 0.0

    def messages_in(self, channel_id: int) -> list[Message]:
        """What a member sees in a channel: not deleted, not ephemeral, oldest first."""
        return [
            m
            for m in self.messages.values()
            if m.channel_id == channel_id and not m.deleted and not m.ephemeral
        ]

    def delete_message(self, channel_id: int, message_id: int) -> None:
        """Delete a message as a moderator would; later edits get 404 / 10008."""
        message = self.messages[message_id]
        if message.channel_id != channel_id:
            raise KeyError(message_id)
        self._delete(message)

    def _delete(self, message: Message) -> None:
        message.deleted = True
        message.deleted_at = time.monotonic()
        if message.guild_id is not None and not message.ephemeral:
            data = {
                "id": str(message.id),
                "channel_id": str(message.channel_id),
                "guild_id": str(message.guild_id),
            }
            self._dispatch_guild(message.guild_id, "MESSAGE_DELETE", data, Intent.GUILD_MESSAGES)
        self._notify()

    def post_user_message(self, channel_id: int, user_id: int, content: str) -> Message:
        """A message a member posts (dispatched as MESSAGE_CREATE)."""
        channel, guild = self._channel(channel_id)
        message = Message(
            id=self._ids(),
            channel_id=channel.id,
            guild_id=guild.id,
            author=self.users[user_id],
            content=content,
        )
        self._add_message(message, guild)
        return message

    # -- faults ------------------------------------------------------------------------

    def rate_limit_next(
        self,
        route: str,
        *,
        retry_after: float = 0.3,
        global_: bool = False,
        scope: str | None = None,
        count: int = 1,
        via: bool = True,
    ) -> None:
        """Answer the next ``count`` calls matching ``route`` with 429.

        ``route`` is ``"[METHOD ]template-or-path-prefix"``. The answer carries
        ``Retry-After`` (whole seconds, rounded up), ``X-RateLimit-*`` with the route's
        bucket, ``X-RateLimit-Scope`` (``scope``, else ``global``/``user``), ``Via: 1.1
        google`` and Discord's JSON body; ``via=False`` answers as Cloudflare does when it
        bans an IP (no ``Via``, an HTML body), which discord.py does not retry.
        """
        headers = {"Retry-After": str(math.ceil(retry_after))}
        if not via:
            text = "<!DOCTYPE html><title>Access denied | discord.com used Cloudflare</title>"
            method, pattern = _split_spec(route)
            self._faults.append(_Fault(method, pattern, count, 429, None, headers, text=text))
            return
        headers["Via"] = "1.1 google"
        headers["X-RateLimit-Scope"] = scope or ("global" if global_ else "user")
        if global_:
            headers["X-RateLimit-Global"] = "true"
        body = {"message": _RATE_LIMIT_MESSAGE, "retry_after": retry_after, "global": global_}
        method, pattern = _split_spec(route)
        self._faults.append(_Fault(method, pattern, count, 429, body, headers))

    def fail_next(
        self,
        route: str,
        status: int = 500,
        *,
        code: int = 0,
        message: str | None = None,
        count: int = 1,
    ) -> None:
        """Answer the next ``count`` calls matching ``route`` (as in ``rate_limit_next``)
        with ``status``: 5xx as Discord's edge does, anything else with Discord's
        ``{"message", "code"}`` body (``code`` from ``ErrorCode``)."""
        method, pattern = _split_spec(route)
        if status >= 502:
            text = f"error code: {status}"
            self._faults.append(_Fault(method, pattern, count, status, None, {}, text=text))
            return
        if message is None:
            message = MESSAGES.get(code) or f"{status}: {_REASONS.get(status, 'Error')}"
        body = {"message": message, "code": code}
        self._faults.append(_Fault(method, pattern, count, status, body, {}))

    def expire_interaction_tokens(self) -> None:
        """End every interaction token handed out so far."""
        for interaction in self.interactions.values():
            interaction.expire()

    # -- the gateway, from tests -------------------------------------------------------

    async def drop_gateway(self, code: int | None = None) -> None:
        """Cut every gateway socket: with no ``code``, the TCP connection dies (as on a
        network fault); with one, the server closes with it (4000: resumable). Sessions
        stay resumable either way; events meanwhile are replayed on RESUME."""
        for connection in self.connections:
            if connection.closed:
                continue
            if code is None:
                connection.abort()
            else:
                await self._close(connection, code)

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT on every open socket; clients resume."""
        for connection in self._open_connections():
            await connection.send(self._op(GatewayOp.RECONNECT, None))

    async def invalidate_sessions(self, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION on every open socket. Not resumable, discord.py
        waits 5 s before it identifies again (its ``before_identify_hook``)."""
        for connection in self._open_connections():
            if connection.session is not None and not resumable:
                connection.session.invalidated = True
            await connection.send(self._op(GatewayOp.INVALID_SESSION, resumable))

    def _open_connections(self) -> list[GatewayConnection]:
        return [c for c in self.connections if not c.closed]

    def _live_sessions(self) -> list[GatewaySession]:
        return [s for s in self.sessions if not s.invalidated]

    async def wait_for_session(self, timeout: float = 5.0) -> GatewaySession:
        """The first live session whose socket is open and has been sent everything."""

        def ready() -> GatewaySession | None:
            for session in self._live_sessions():
                connection = session.connection
                if (
                    connection is not None
                    and not connection.closed
                    and connection.sent == session.seq
                ):
                    return session
            return None

        await self.wait_until(lambda: ready() is not None, timeout, "a gateway session")
        session = ready()
        assert session is not None
        return session

    # -- interactions, from tests ------------------------------------------------------

    async def send_slash_command(
        self,
        guild_id: int,
        channel_id: int,
        user_id: int,
        name: str,
        options: Mapping[str, Any] | Sequence[JSON] | None = None,
        *,
        subcommand: str | None = None,
        group: str | None = None,
        attachments: Mapping[str, Attachment | tuple[str, bytes]] | None = None,
        locale: str = "en-US",
        channel_nsfw: bool | None = None,
    ) -> Interaction:
        """Run a registered chat-input command as a member would (INTERACTION_CREATE,
        type 2).

        ``options`` maps option names to values, converted by the registered option
        types: ``str``, ``int``, ``float``, ``bool``, a ``User``/``Channel``/``Role``
        (or its id) for the snowflake types, an ``Attachment`` (``upload``) for type 11.
        ``attachments`` maps option names to ``(filename, bytes)`` or ``Attachment`` for
        short. A list passes raw option payloads through. Like Discord's client, this
        refuses what Discord would not send: an unknown command or option, a missing
        required option, a value outside the choices or bounds (``ValueError``).
        ``channel_nsfw`` first sets the channel's age restriction (CHANNEL_UPDATE), as a
        moderator would: discord.py reads it from its cache, not from the interaction.
        ``default_member_permissions`` is not enforced, as if the guild overrode it.
        """
        guild, channel, member = self._context(guild_id, channel_id, user_id)
        if channel_nsfw is not None and channel.nsfw != channel_nsfw:
            guild.update_channel(channel, nsfw=channel_nsfw)
        command = self._registered(guild.id, name, 1)
        spec = self._option_scope(command, group, subcommand)
        resolved: dict[str, dict[str, JSON]] = {}
        merged: Mapping[str, Any] | Sequence[JSON] | None = options
        if attachments:
            merged = (
                dict(options or {}) if isinstance(options, Mapping) or options is None else options
            )
            if not isinstance(merged, dict):
                raise TypeError("attachments= needs options as a mapping")
            for option_name, value in attachments.items():
                merged[option_name] = (
                    value if isinstance(value, Attachment) else self.upload(*value)
                )
        built = self._build_options(spec, merged, guild, resolved, focused=None)
        data = self._command_data(command, name, self._nest(built, group, subcommand))
        if resolved:
            data["resolved"] = resolved
        return await self._interact(
            InteractionType.APPLICATION_COMMAND, guild, channel, member, data, locale
        )

    async def send_autocomplete(
        self,
        guild_id: int,
        channel_id: int,
        user_id: int,
        name: str,
        options: Mapping[str, Any],
        *,
        focused: str,
        subcommand: str | None = None,
        group: str | None = None,
        locale: str = "en-US",
    ) -> Interaction:
        """A member typing into option ``focused`` (INTERACTION_CREATE, type 4): its value
        is sent as the text typed so far; the answer is a type 8 callback."""
        guild, channel, member = self._context(guild_id, channel_id, user_id)
        command = self._registered(guild.id, name, 1)
        spec = self._option_scope(command, group, subcommand)
        resolved: dict[str, dict[str, JSON]] = {}
        built = self._build_options(spec, options, guild, resolved, focused=focused)
        data = self._command_data(command, name, self._nest(built, group, subcommand))
        return await self._interact(
            InteractionType.APPLICATION_COMMAND_AUTOCOMPLETE,
            guild,
            channel,
            member,
            data,
            locale,
        )

    async def click_button(
        self, message: Message | int, custom_id: str, user_id: int, *, locale: str = "en-US"
    ) -> Interaction:
        """A member clicking the button ``custom_id`` of ``message`` (type 3)."""
        return await self._component(message, custom_id, user_id, None, locale)

    async def select_values(
        self,
        message: Message | int,
        custom_id: str,
        user_id: int,
        values: Sequence[str],
        *,
        locale: str = "en-US",
    ) -> Interaction:
        """A member choosing ``values`` in the select menu ``custom_id`` (type 3)."""
        return await self._component(message, custom_id, user_id, list(values), locale)

    async def submit_modal(
        self,
        interaction: Interaction,
        values: Mapping[str, str],
        *,
        user_id: int | None = None,
        locale: str = "en-US",
    ) -> Interaction:
        """Submit the modal that ``interaction`` answered with (type 9), its text inputs
        filled from ``values`` (custom_id -> text): INTERACTION_CREATE type 5."""
        if interaction.response_type != CallbackType.MODAL:
            raise ValueError("that interaction was not answered with a modal")
        modal = interaction.response_data
        guild, channel, member = self._context(
            interaction.guild_id or 0, interaction.channel_id, user_id or interaction.user_id
        )

        def submitted(component: JSON) -> JSON:
            kind = component.get("type")
            if kind == 1:
                children = [submitted(c) for c in component.get("components", [])]
                return {"type": 1, "id": component.get("id"), "components": children}
            if kind == 18:
                inner = submitted(component["component"])
                return {"type": 18, "id": component.get("id"), "component": inner}
            result = {
                "type": kind,
                "id": component.get("id"),
                "custom_id": component.get("custom_id"),
            }
            if kind == 4:
                result["value"] = values.get(str(component.get("custom_id")), "")
            elif kind in _SELECT_TYPES:
                result["values"] = []
            return result

        components = _number_components(list(modal.get("components", [])))
        data = {
            "custom_id": modal.get("custom_id"),
            "components": [submitted(c) for c in components],
        }
        return await self._interact(
            InteractionType.MODAL_SUBMIT,
            guild,
            channel,
            member,
            data,
            locale,
            message=interaction.message,
        )

    async def _component(
        self,
        message: Message | int,
        custom_id: str,
        user_id: int,
        values: list[str] | None,
        locale: str,
    ) -> Interaction:
        target = message if isinstance(message, Message) else self.messages[message]
        if target.deleted:
            raise ValueError(f"message {target.id} was deleted")
        try:
            component = target.component(custom_id)
        except KeyError:
            raise ValueError(f"message {target.id} has no component {custom_id!r}") from None
        if component.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled")
        kind = int(component["type"])
        if values is None and kind != 2:
            raise ValueError(f"component {custom_id!r} is not a button")
        if values is not None and kind not in _SELECT_TYPES:
            raise ValueError(f"component {custom_id!r} is not a select menu")
        guild, channel, member = self._context(target.guild_id or 0, target.channel_id, user_id)
        data: JSON = {"custom_id": custom_id, "component_type": kind, "id": component.get("id")}
        if values is not None:
            data["values"] = values
        return await self._interact(
            InteractionType.MESSAGE_COMPONENT,
            guild,
            channel,
            member,
            data,
            locale,
            message=target,
        )

    def _context(
        self, guild_id: int, channel_id: int, user_id: int
    ) -> tuple[Guild, Channel, Member]:
        guild = self.guilds.get(guild_id)
        if guild is None:
            raise ValueError(f"no guild {guild_id}")
        channel = guild.channels.get(channel_id)
        if channel is None:
            raise ValueError(f"no channel {channel_id} in guild {guild_id}")
        member = guild.members.get(user_id)
        if member is None:
            raise ValueError(f"user {user_id} is not a member of guild {guild_id}")
        return guild, channel, member

    def _registered(self, guild_id: int, name: str, kind: int) -> JSON:
        for scope in (guild_id, None):
            for command in self.commands.get(scope, {}).values():
                if command["name"] == name and command.get("type", 1) == kind:
                    return command
        raise ValueError(f"no command {name!r} is registered for guild {guild_id} or globally")

    @staticmethod
    def _option_scope(command: JSON, group: str | None, subcommand: str | None) -> list[JSON]:
        options: list[JSON] = list(command.get("options") or [])
        for wanted, kind in (
            (group, OptionType.SUB_COMMAND_GROUP),
            (subcommand, OptionType.SUB_COMMAND),
        ):
            if wanted is None:
                continue
            match = next((o for o in options if o["name"] == wanted and o["type"] == kind), None)
            if match is None:
                raise ValueError(
                    f"command {command['name']!r} has no {kind.name.lower()} {wanted!r}"
                )
            options = list(match.get("options") or [])
        if any(
            o["type"] in (OptionType.SUB_COMMAND, OptionType.SUB_COMMAND_GROUP) for o in options
        ):
            raise ValueError(f"command {command['name']!r} needs a subcommand (and group)")
        return options

    @staticmethod
    def _nest(options: list[JSON], group: str | None, subcommand: str | None) -> list[JSON]:
        if subcommand is not None:
            options = [
                {"type": int(OptionType.SUB_COMMAND), "name": subcommand, "options": options}
            ]
        if group is not None:
            options = [
                {"type": int(OptionType.SUB_COMMAND_GROUP), "name": group, "options": options}
            ]
        return options

    @staticmethod
    def _command_data(command: JSON, name: str, options: list[JSON]) -> JSON:
        data: JSON = {"id": command["id"], "name": name, "type": command.get("type", 1)}
        if options:
            data["options"] = options
        if command.get("guild_id") is not None:
            data["guild_id"] = command["guild_id"]
        return data

    def _build_options(
        self,
        spec: list[JSON],
        given: Mapping[str, Any] | Sequence[JSON] | None,
        guild: Guild,
        resolved: dict[str, dict[str, JSON]],
        *,
        focused: str | None,
    ) -> list[JSON]:
        if given is not None and not isinstance(given, Mapping):
            return [dict(o) for o in given]
        values = dict(given or {})
        by_name = {o["name"]: o for o in spec}
        unknown = set(values) - set(by_name)
        if unknown:
            raise ValueError(f"no such options: {sorted(unknown)}")
        if focused is not None and focused not in by_name:
            raise ValueError(f"no option {focused!r} to focus")
        built: list[JSON] = []
        for option in spec:
            name = option["name"]
            if name == focused:
                built.append(
                    {
                        "name": name,
                        "type": option["type"],
                        "value": str(values.get(name, "")),
                        "focused": True,
                    }
                )
                continue
            if name not in values:
                if option.get("required") and focused is None:
                    raise ValueError(f"option {name!r} is required")
                continue
            value = self._option_value(option, values[name], guild, resolved)
            built.append({"name": name, "type": option["type"], "value": value})
        return built

    def _option_value(
        self, option: JSON, value: Any, guild: Guild, resolved: dict[str, dict[str, JSON]]
    ) -> Any:
        kind = OptionType(option["type"])
        name = option["name"]
        if kind == OptionType.STRING:
            if not isinstance(value, str):
                raise ValueError(f"option {name!r} takes a string")
            low, high = option.get("min_length", 0), option.get("max_length", 6000)
            if not low <= len(value) <= high:
                raise ValueError(f"option {name!r} must be {low} to {high} characters")
        elif kind in (OptionType.INTEGER, OptionType.NUMBER):
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if not numeric or (kind == OptionType.INTEGER and not isinstance(value, int)):
                raise ValueError(f"option {name!r} takes a {kind.name.lower()}")
            low, high = option.get("min_value"), option.get("max_value")
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"option {name!r} must be within [{low}, {high}]")
        elif kind == OptionType.BOOLEAN:
            if not isinstance(value, bool):
                raise ValueError(f"option {name!r} takes a bool")
        elif kind == OptionType.ATTACHMENT:
            if not isinstance(value, Attachment):
                raise ValueError(f"option {name!r} takes an Attachment (emulator.upload)")
            resolved.setdefault("attachments", {})[str(value.id)] = value.to_json()
            return str(value.id)
        else:
            types = [int(t) for t in option.get("channel_types") or []]
            return self._resolve_snowflake(kind, name, value, guild, resolved, types)
        choices = option.get("choices")
        if choices and value not in [c["value"] for c in choices]:
            raise ValueError(f"option {name!r} must be one of its choices")
        return value

    def _resolve_snowflake(
        self,
        kind: OptionType,
        name: str,
        value: Any,
        guild: Guild,
        resolved: dict[str, dict[str, JSON]],
        channel_types: list[int],
    ) -> str:
        target = value.id if isinstance(value, User | Channel | Role) else int(value)
        key = str(target)
        if kind in (OptionType.USER, OptionType.MENTIONABLE) and target in self.users:
            resolved.setdefault("users", {})[key] = self.users[target].to_json()
            member = guild.members.get(target)
            if member is not None:
                data = member.to_json()
                del data["user"]
                data["permissions"] = str(guild.base_permissions(target))
                resolved.setdefault("members", {})[key] = data
            return key
        if kind in (OptionType.ROLE, OptionType.MENTIONABLE) and target in guild.roles:
            resolved.setdefault("roles", {})[key] = guild.roles[target].to_json()
            return key
        if kind == OptionType.CHANNEL and target in guild.channels:
            channel = guild.channels[target]
            if channel_types and channel.type not in channel_types:
                raise ValueError(f"option {name!r} does not take a channel of type {channel.type}")
            data = {
                "id": key,
                "name": channel.name,
                "type": channel.type,
                "permissions": str(guild.permissions_in(channel, self.bot_user.id)),
                "parent_id": None if channel.parent_id is None else str(channel.parent_id),
                "nsfw": channel.nsfw,
                "flags": 0,
            }
            resolved.setdefault("channels", {})[key] = data
            return key
        raise ValueError(f"option {name!r}: nothing of type {kind.name.lower()} with id {target}")

    async def _interact(
        self,
        kind: InteractionType,
        guild: Guild,
        channel: Channel,
        member: Member,
        data: JSON,
        locale: str,
        *,
        message: Message | None = None,
    ) -> Interaction:
        sessions = [s for s in self._live_sessions() if s.has_guild(guild.id)]
        if not sessions:
            raise RuntimeError("no bot session on the gateway to deliver an interaction to")
        interaction_id = self._ids()
        raw = f"interaction:{interaction_id}:{secrets.token_urlsafe(48)}"
        token = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
        user_permissions = guild.permissions_in(channel, member.user.id)
        member_json = member.to_json()
        member_json["permissions"] = str(user_permissions)
        channel_json = channel.to_json()
        channel_json["permissions"] = str(user_permissions)
        payload: JSON = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": int(kind),
            "data": data,
            "guild_id": str(guild.id),
            "guild": {
                "id": str(guild.id),
                "locale": guild.preferred_locale,
                "features": guild.features,
            },
            "channel_id": str(channel.id),
            "channel": channel_json,
            "member": member_json,
            "token": token,
            "version": 1,
            "app_permissions": str(guild.permissions_in(channel, self.bot_user.id)),
            "locale": locale,
            "guild_locale": guild.preferred_locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            "authorizing_integration_owners": {"0": str(guild.id)},
            "context": 0,
            "attachment_size_limit": guild.attachment_size_limit or self.attachment_size_limit,
        }
        if message is not None:
            payload["message"] = message.to_json()
        interaction = Interaction(
            id=interaction_id,
            token=token,
            type=int(kind),
            payload=payload,
            guild_id=guild.id,
            channel_id=channel.id,
            user_id=member.user.id,
            created_at=time.monotonic(),
            message=message,
        )
        self.interactions[interaction_id] = interaction
        self._by_token[token] = interaction
        for session in sessions:
            session.push("INTERACTION_CREATE", payload)
        self._notify()
        return interaction

    # -- gateway dispatch --------------------------------------------------------------

    def _dispatch_guild(self, guild_id: int, event: str, data: JSON, intent: int) -> None:
        for session in self._live_sessions():
            if session.intents & intent and session.has_guild(guild_id):
                session.push(event, data)

    def _guild_create(self, guild: Guild, session: GatewaySession) -> JSON:
        data = guild.to_json()
        if session.intents & Intent.GUILD_MEMBERS:
            members = list(guild.members.values())
        else:
            members = [guild.members[self.bot_user.id]]
        data.update(
            {
                "joined_at": _iso(guild.members[self.bot_user.id].joined_at),
                "large": False,
                "unavailable": False,
                "lazy": True,
                "member_count": len(guild.members),
                "members": [m.to_json() for m in members],
                "channels": [c.to_json() for c in guild.channels.values()],
                "threads": [],
                "presences": [],
                "voice_states": [],
                "stage_instances": [],
                "guild_scheduled_events": [],
                "soundboard_sounds": [],
                "embedded_activities": [],
                "activity_instances": [],
                "application_command_counts": {},
                "version": int(time.time() * 1000),
            }
        )
        return data

    def _add_message(self, message: Message, guild: Guild | None) -> None:
        self.messages[message.id] = message
        channel_json = None
        if guild is not None:
            channel = guild.channels.get(message.channel_id)
            if channel is not None and not message.ephemeral:
                channel.last_message_id = message.id
                channel_json = channel
        if guild is not None and channel_json is not None:
            member = guild.members.get(message.author.id)
            for session in self._live_sessions():
                if session.intents & Intent.GUILD_MESSAGES and session.has_guild(guild.id):
                    session.push("MESSAGE_CREATE", self._gateway_message(message, member, session))
        self._notify()

    def _gateway_message(
        self, message: Message, member: Member | None, session: GatewaySession
    ) -> JSON:
        data = message.to_json(gateway_member=member or Member(user=message.author))
        blind = not session.intents & Intent.MESSAGE_CONTENT
        if (
            blind
            and message.author.id != self.bot_user.id
            and self.bot_user.mention not in message.content
        ):
            data.update(content="", embeds=[], attachments=[], components=[])
        return data

    def _message_updated(self, message: Message) -> None:
        if message.guild_id is not None and not message.ephemeral:
            guild = self.guilds.get(message.guild_id)
            member = guild.members.get(message.author.id) if guild else None
            for session in self._live_sessions():
                if session.intents & Intent.GUILD_MESSAGES and session.has_guild(message.guild_id):
                    session.push("MESSAGE_UPDATE", self._gateway_message(message, member, session))
        self._notify()

    # -- REST plumbing -----------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        version = re.match(r"^v(\d+)(/|$)", tail)
        path = "/" + (tail[version.end() :] if version else tail)
        path = path if path == "/" else path.rstrip("/")
        route, params, known_path = self._match(request.method, path)
        headers = {
            name: request.headers[name]
            for name in ("Authorization", "Content-Type", "User-Agent", "X-Audit-Log-Reason")
            if name in request.headers
        }
        call = Call(
            method=request.method,
            route=route.template if route else path,
            path=path,
            params=params,
            query=dict(request.query),
            json=None,
            files=[],
            headers=headers,
            time=time.monotonic(),
        )
        self.calls.append(call)
        try:
            reply_headers: dict[str, str] = {}
            try:
                call.json, call.files = await self._read_body(request)
                reply = await self._answer(call, route, known_path, reply_headers)
            except ApiError as error:
                reply = _Reply(error.status, error.body)
                reply_headers.update(error.headers)
            response = self._response(reply, reply_headers)
            call.status = reply.status
            call.response = reply.body
        except _TextReply as text:
            call.status = text.status
            call.response = text.text
            response = web.Response(status=text.status, text=text.text, headers=text.headers)
        if call.status in (401, 403) or (
            call.status == 429 and response.headers.get("X-RateLimit-Scope") != "shared"
        ):
            self.invalid_requests += 1
        self._notify()
        return response

    @staticmethod
    def _response(reply: _Reply, headers: dict[str, str]) -> web.Response:
        if reply.body is None:
            return web.Response(status=reply.status, headers=headers)
        body = json.dumps(reply.body, separators=(",", ":")).encode()
        # Exactly application/json: discord.py parses nothing else (no charset).
        headers["Content-Type"] = "application/json"
        return web.Response(status=reply.status, body=body, headers=headers)

    @staticmethod
    def _match(method: str, path: str) -> tuple[_Route | None, dict[str, str], bool]:
        """The route for ``method`` and ``path``, its parameters, and whether the path is
        known at all (for 405 against 404)."""
        known = False
        for route in ROUTES:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.method == method:
                return route, found.groupdict(), True
            known = True
        return None, {}, known

    async def _read_body(self, request: web.Request) -> tuple[Any, list[Upload]]:
        if request.content_type == "multipart/form-data":
            payload: Any = None
            files: list[Upload] = []
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, aiohttp.BodyPartReader):
                    continue
                if part.filename is not None:
                    data = bytes(await part.read(decode=False))
                    kind = part.headers.get(aiohttp.hdrs.CONTENT_TYPE, "application/octet-stream")
                    files.append(Upload(part.name or "", part.filename, kind, data))
                elif part.name == "payload_json":
                    payload = self._parse_json(await part.text())
            return payload, files
        raw = await request.read()
        if not raw:
            return None, []
        if request.content_type == "application/json":
            return self._parse_json(raw.decode("utf-8", "replace")), []
        return None, []

    @staticmethod
    def _parse_json(text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            raise ApiError.of(400, ErrorCode.INVALID_JSON) from None

    async def _answer(
        self, call: Call, route: _Route | None, known_path: bool, headers: dict[str, str]
    ) -> _Reply:
        if route is None:
            if known_path:
                return _Reply(405, {"message": "405: Method Not Allowed", "code": 0})
            return _Reply(404, {"message": "404: Not Found", "code": 0})
        if route.auth == "bot" and call.headers.get("Authorization") != f"Bot {self.token}":
            return _Reply(401, {"message": "401: Unauthorized", "code": 0})
        fault = self._take_fault(call)
        bucket_key = f"{call.method} {route.template}"
        limit = self.route_limits.get(bucket_key, DEFAULT_ROUTE_LIMIT)
        bucket_hash = _bucket_hash(bucket_key)
        if fault is not None:
            return self._fault_reply(fault, bucket_hash, limit, headers)
        if route.auth == "bot":
            self._check_global(call)
        self._take_token(call, route, bucket_hash, limit, headers)
        handler: _Handler = getattr(self, route.handler)
        return await handler(call)

    def _take_fault(self, call: Call) -> _Fault | None:
        for fault in self._faults:
            if fault.method is not None and fault.method != call.method:
                continue
            if _spec_matches(fault.pattern, call.method, call.route, call.path, prefix=True):
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _fault_reply(
        self, fault: _Fault, bucket_hash: str, limit: tuple[int, float], headers: dict[str, str]
    ) -> _Reply:
        headers.update(fault.headers)
        if fault.status == 429 and fault.body is not None and not fault.body["global"]:
            retry_after = float(fault.body["retry_after"])
            headers.update(
                {
                    "X-RateLimit-Limit": str(limit[0]),
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
                    "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                    "X-RateLimit-Bucket": bucket_hash,
                }
            )
        if fault.text is not None:
            raise _TextReply(fault.status, fault.text, headers)
        return _Reply(fault.status, fault.body)

    def _check_global(self, call: Call) -> None:
        if self.global_rate_limit is None:
            return
        now = time.monotonic()
        started, count = self._global_window
        if now - started >= 1.0:
            started, count = now, 0
        count += 1
        self._global_window = (started, count)
        if count > self.global_rate_limit:
            retry_after = round(1.0 - (now - started), 3)
            headers = {
                "Retry-After": str(math.ceil(retry_after)),
                "X-RateLimit-Global": "true",
                "X-RateLimit-Scope": "global",
                "Via": "1.1 google",
            }
            body = {"message": _RATE_LIMIT_MESSAGE, "retry_after": retry_after, "global": True}
            raise ApiError(429, body, headers)

    def _take_token(
        self,
        call: Call,
        route: _Route,
        bucket_hash: str,
        limit: tuple[int, float],
        headers: dict[str, str],
    ) -> None:
        major = "+".join(call.params[k] for k in _MAJOR_PARAMETERS if k in call.params)
        key = f"{bucket_hash}:{major}"
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None or now >= bucket.reset_at or bucket.limit != limit[0]:
            bucket = _Bucket(
                limit=limit[0], window=limit[1], remaining=limit[0], reset_at=now + limit[1]
            )
            self._buckets[key] = bucket
        reset_after = max(bucket.reset_at - now, 0.0)
        rate_headers = {
            "X-RateLimit-Limit": str(bucket.limit),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": bucket_hash,
        }
        if bucket.remaining <= 0:
            rate_headers.update(
                {
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Scope": "user",
                    "Retry-After": str(math.ceil(reset_after)),
                    "Via": "1.1 google",
                }
            )
            body = {
                "message": _RATE_LIMIT_MESSAGE,
                "retry_after": round(reset_after, 3),
                "global": False,
            }
            raise ApiError(429, body, rate_headers)
        bucket.remaining -= 1
        rate_headers["X-RateLimit-Remaining"] = str(bucket.remaining)
        headers.update(rate_headers)

    # -- REST: gateway, users, application ---------------------------------------------

    async def _get_gateway(self, call: Call) -> _Reply:
        return _Reply(200, {"url": self.gateway_url})

    async def _get_gateway_bot(self, call: Call) -> _Reply:
        limit = {"total": 1000, "remaining": 999, "reset_after": 14400000, "max_concurrency": 1}
        return _Reply(200, {"url": self.gateway_url, "shards": 1, "session_start_limit": limit})

    def _me(self) -> JSON:
        data = self.bot_user.to_json()
        data.update(verified=True, mfa_enabled=False, email=None, locale="en-US", bio="")
        return data

    async def _get_me(self, call: Call) -> _Reply:
        return _Reply(200, self._me())

    async def _get_user(self, call: Call) -> _Reply:
        user = self.users.get(_int(call.params["user_id"]))
        if user is None:
            raise ApiError.of(404, ErrorCode.UNKNOWN_USER)
        return _Reply(200, user.to_json())

    def _application_flags(self) -> int:
        # GATEWAY_*_LIMITED: what an unverified bot gets when the portal toggles are on.
        flags = 1 << 23  # APPLICATION_COMMAND_BADGE
        if self.allowed_intents & Intent.GUILD_PRESENCES:
            flags |= 1 << 13
        if self.allowed_intents & Intent.GUILD_MEMBERS:
            flags |= 1 << 15
        if self.allowed_intents & Intent.MESSAGE_CONTENT:
            flags |= 1 << 19
        return flags

    async def _get_application(self, call: Call) -> _Reply:
        body: JSON = {
            "id": str(self.application_id),
            "name": self.bot_user.username,
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "is_monetized": False,
            "is_verified": False,
            "is_discoverable": False,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": hashlib.sha256(str(self.application_id).encode()).hexdigest(),
            "flags": self._application_flags(),
            "hook": True,
            "storefront_available": False,
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "role_connections_verification_url": None,
            "owner": self.owner.to_json(),
            "team": None,
            "approximate_guild_count": len(self.guilds),
            "approximate_user_install_count": 0,
            "interactions_event_types": [],
            "interactions_version": 1,
            "explicit_content_filter": 0,
            "rpc_application_state": 0,
            "integration_types_config": {"0": {}},
            "bot": self._me(),
        }
        return _Reply(200, body)

    # -- REST: commands ----------------------------------------------------------------

    def _command_scope(self, call: Call) -> int | None:
        if _int(call.params["application_id"]) != self.application_id:
            raise ApiError.of(403, ErrorCode.MISSING_ACCESS)
        if "guild_id" not in call.params:
            return None
        guild_id = _int(call.params["guild_id"])
        if guild_id not in self.guilds:
            raise ApiError.of(403, ErrorCode.MISSING_ACCESS)
        return guild_id

    def _stored_command(self, scope: int | None, body: JSON, old: JSON | None) -> JSON:
        kind = body.get("type", 1)
        command: JSON = {
            "id": old["id"] if old else str(self._ids()),
            "application_id": str(self.application_id),
            "version": str(self._ids()),
            "default_member_permissions": body.get("default_member_permissions"),
            "type": kind,
            "name": body["name"],
            "name_localizations": body.get("name_localizations"),
            "description": body.get("description", ""),
            "description_localizations": body.get("description_localizations"),
            "contexts": body.get("contexts"),
            "integration_types": body.get("integration_types") or [0],
            "nsfw": bool(body.get("nsfw", False)),
        }
        if scope is None:
            command["dm_permission"] = body.get("dm_permission", True)
        else:
            command["guild_id"] = str(scope)
        if body.get("options"):
            command["options"] = json.loads(json.dumps(body["options"]))
        return command

    def _check_command_limits(self, commands: Sequence[JSON]) -> None:
        for kind, most in ((1, 100), (2, 5), (3, 5)):
            if sum(1 for c in commands if c.get("type", 1) == kind) > most:
                raise ApiError.of(400, ErrorCode.MAX_APPLICATION_COMMANDS)

    async def _get_commands(self, call: Call) -> _Reply:
        scope = self._command_scope(call)
        return _Reply(200, list(self.commands.get(scope, {}).values()))

    async def _put_commands(self, call: Call) -> _Reply:
        scope = self._command_scope(call)
        body = call.json
        errors = _FormErrors()
        if not isinstance(body, list):
            errors.add((), "BASE_TYPE_ARRAY", "Must be an array.")
            raise ApiError.form(errors)
        seen: set[tuple[str, int]] = set()
        for index, command in enumerate(body):
            _check_command((index,), command, errors)
            if isinstance(command, dict):
                key = (str(command.get("name")), int(command.get("type", 1)))
                if key in seen:
                    message = "Application command names must be unique"
                    errors.add((index, "name"), "APPLICATION_COMMANDS_DUPLICATE_NAME", message)
                seen.add(key)
        if errors:
            raise ApiError.form(errors)
        self._check_command_limits(body)
        existing = {(c["name"], c.get("type", 1)): c for c in self.commands.get(scope, {}).values()}
        stored = [
            self._stored_command(scope, c, existing.get((c["name"], c.get("type", 1))))
            for c in body
        ]
        self.commands[scope] = {int(c["id"]): c for c in stored}
        self._notify()
        return _Reply(200, stored)

    async def _post_command(self, call: Call) -> _Reply:
        scope = self._command_scope(call)
        errors = _FormErrors()
        _check_command((), call.json, errors)
        if errors:
            raise ApiError.form(errors)
        body: JSON = call.json
        commands = self.commands.setdefault(scope, {})
        old = next(
            (
                c
                for c in commands.values()
                if c["name"] == body["name"] and c.get("type", 1) == body.get("type", 1)
            ),
            None,
        )
        if old is None:
            self._check_command_limits([*commands.values(), body])
        command = self._stored_command(scope, body, old)
        commands[int(command["id"])] = command
        self._notify()
        return _Reply(200 if old else 201, command)

    def _command(self, call: Call) -> tuple[int | None, JSON]:
        scope = self._command_scope(call)
        command = self.commands.get(scope, {}).get(_int(call.params["command_id"]))
        if command is None:
            raise ApiError.of(404, ErrorCode.UNKNOWN_APPLICATION_COMMAND)
        return scope, command

    async def _get_command(self, call: Call) -> _Reply:
        return _Reply(200, self._command(call)[1])

    async def _patch_command(self, call: Call) -> _Reply:
        scope, command = self._command(call)
        body = {**command, **(call.json or {})}
        errors = _FormErrors()
        _check_command((), body, errors)
        if errors:
            raise ApiError.form(errors)
        updated = self._stored_command(scope, body, command)
        self.commands[scope][int(updated["id"])] = updated
        self._notify()
        return _Reply(200, updated)

    async def _delete_command(self, call: Call) -> _Reply:
        scope, command = self._command(call)
        del self.commands[scope][int(command["id"])]
        return _Reply(204)

    # -- REST: interactions ------------------------------------------------------------

    def _interaction_expired(self, interaction: Interaction) -> bool:
        age = time.monotonic() - interaction.created_at
        return interaction.expired or age > self.interaction_token_ttl

    async def _callback(self, call: Call) -> _Reply:
        interaction = self.interactions.get(_int(call.params["webhook_id"]))
        if interaction is None:
            raise ApiError.of(404, ErrorCode.UNKNOWN_INTERACTION)
        if interaction.token != call.params["webhook_token"]:
            raise ApiError.of(401, ErrorCode.INVALID_WEBHOOK_TOKEN)
        interaction.callbacks.append(call)
        if interaction.response is not None:
            raise ApiError.of(400, ErrorCode.ALREADY_ACKNOWLEDGED)
        late = call.time - interaction.created_at > self.interaction_response_window
        if late or self._interaction_expired(interaction):
            raise ApiError.of(404, ErrorCode.UNKNOWN_INTERACTION)
        body = call.json if isinstance(call.json, dict) else {}
        kind = body.get("type")
        allowed = _CALLBACKS_FOR.get(interaction.type, set())
        if kind not in allowed:
            errors = _FormErrors()
            choices = ", ".join(str(int(c)) for c in sorted(allowed))
            errors.add(("type",), "BASE_TYPE_CHOICES", f"Value must be one of {{{choices}}}.")
            raise ApiError.form(errors)
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        assert isinstance(data, dict)
        message = await self._respond(interaction, CallbackType(kind), data, call)
        interaction.response = call
        interaction._responded.set()
        self._notify()
        if call.query.get("with_response", "").lower() not in ("true", "1"):
            return _Reply(204)
        callback: JSON = {"id": str(interaction.id), "type": interaction.type}
        resource: JSON = {"type": kind}
        if message is not None:
            callback["response_message_id"] = str(message.id)
            callback["response_message_loading"] = message.loading
            callback["response_message_ephemeral"] = message.ephemeral
            resource["message"] = message.to_json()
        return _Reply(200, {"interaction": callback, "resource": resource})

    async def _respond(
        self, interaction: Interaction, kind: CallbackType, data: JSON, call: Call
    ) -> Message | None:
        guild = self.guilds.get(interaction.guild_id or 0)
        if kind == CallbackType.APPLICATION_COMMAND_AUTOCOMPLETE_RESULT:
            errors = _FormErrors()
            choices = data.get("choices") or []
            errors.at_most(("data", "choices"), choices, 25)
            for index, choice in enumerate(choices):
                errors.length(("data", "choices", index, "name"), choice.get("name"), 1, 100)
            if errors:
                raise ApiError.form(errors)
            return None
        if kind == CallbackType.MODAL:
            errors = _FormErrors()
            errors.length(("data", "title"), data.get("title"), 1, 45)
            errors.length(("data", "custom_id"), data.get("custom_id"), 1, 100)
            components = data.get("components") or []
            if not 1 <= len(components) <= 5:
                errors.add(
                    ("data", "components"),
                    "BASE_TYPE_BAD_LENGTH",
                    "Must be between 1 and 5 in length.",
                )
            if errors:
                raise ApiError.form(errors)
            return None
        if kind == CallbackType.DEFERRED_UPDATE_MESSAGE:
            interaction.original = interaction.message
            return None
        if kind == CallbackType.UPDATE_MESSAGE:
            target = interaction.message
            assert target is not None
            self._check_message(
                data, call.files, creating=False, guild=guild, channel_id=target.channel_id
            )
            self._edit(target, data, call.files, "component", call)
            interaction.original = target
            return target
        flags = int(data.get("flags") or 0)
        if kind == CallbackType.DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE:
            message = self._interaction_message(
                interaction, flags & MessageFlag.EPHEMERAL | MessageFlag.LOADING
            )
        else:
            self._check_message(
                data, call.files, creating=True, guild=guild, channel_id=interaction.channel_id
            )
            message = self._interaction_message(interaction, flags)
            self._fill(message, data, call.files, editing=False)
        interaction.original = message
        self._add_message(message, guild)
        return message

    def _interaction_message(self, interaction: Interaction, flags: int) -> Message:
        user = self.users[interaction.user_id]
        if interaction.type == InteractionType.APPLICATION_COMMAND:
            kind = 20
            metadata: JSON = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": user.to_json(),
                "authorizing_integration_owners": {"0": str(interaction.guild_id)},
                "name": interaction.payload["data"]["name"],
                "command_type": 1,
            }
        else:
            kind = 0 if interaction.type == InteractionType.MESSAGE_COMPONENT else 20
            metadata = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": user.to_json(),
                "authorizing_integration_owners": {"0": str(interaction.guild_id)},
            }
            if interaction.message is not None:
                metadata["interacted_message_id"] = str(interaction.message.id)
        return Message(
            id=self._ids(),
            channel_id=interaction.channel_id,
            guild_id=interaction.guild_id,
            author=self.bot_user,
            flags=flags,
            type=kind,
            webhook_id=self.application_id,
            application_id=self.application_id,
            interaction_metadata=metadata,
        )

    def _token_interaction(self, call: Call) -> Interaction:
        if _int(call.params["webhook_id"]) != self.application_id:
            raise ApiError.of(404, ErrorCode.UNKNOWN_WEBHOOK)
        interaction = self._by_token.get(call.params["webhook_token"])
        if interaction is None or self._interaction_expired(interaction):
            raise ApiError.of(401, ErrorCode.INVALID_WEBHOOK_TOKEN)
        return interaction

    def _webhook_target(self, call: Call, interaction: Interaction) -> Message:
        if "message_id" not in call.params:
            message = interaction.original
            if interaction.response is None or message is None:
                raise ApiError.of(404, ErrorCode.UNKNOWN_MESSAGE)
        else:
            wanted = _int(call.params["message_id"])
            owned = [m for m in (interaction.original, *interaction.followups) if m is not None]
            found = next((m for m in owned if m.id == wanted), None)
            if found is None:
                raise ApiError.of(404, ErrorCode.UNKNOWN_MESSAGE)
            message = found
        if message.deleted:
            raise ApiError.of(404, ErrorCode.UNKNOWN_MESSAGE)
        return message

    async def _get_webhook_message(self, call: Call) -> _Reply:
        interaction = self._token_interaction(call)
        return _Reply(200, self._webhook_target(call, interaction).to_json())

    async def _patch_webhook_message(self, call: Call) -> _Reply:
        interaction = self._token_interaction(call)
        message = self._webhook_target(call, interaction)
        body = call.json if isinstance(call.json, dict) else {}
        guild = self.guilds.get(interaction.guild_id or 0)
        self._check_message(
            body, call.files, creating=False, guild=guild, channel_id=message.channel_id
        )
        self._edit(message, body, call.files, "webhook", call)
        return _Reply(200, message.to_json())

    async def _delete_webhook_message(self, call: Call) -> _Reply:
        interaction = self._token_interaction(call)
        self._delete(self._webhook_target(call, interaction))
        return _Reply(204)

    async def _post_followup(self, call: Call) -> _Reply:
        interaction = self._token_interaction(call)
        if interaction.response is None:
            raise ApiError.of(404, ErrorCode.UNKNOWN_WEBHOOK)
        body = call.json if isinstance(call.json, dict) else {}
        guild = self.guilds.get(interaction.guild_id or 0)
        self._check_message(
            body, call.files, creating=True, guild=guild, channel_id=interaction.channel_id
        )
        original = interaction.original
        deferred = interaction.response_type == CallbackType.DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE
        if deferred and original is not None and original.loading and not original.deleted:
            # The first followup after a thinking defer replaces the loading message.
            self._edit(original, body, call.files, "webhook", call)
            message = original
        else:
            flags = int(body.get("flags") or 0)
            message = self._interaction_message(interaction, flags)
            self._fill(message, body, call.files, editing=False)
            self._add_message(message, guild)
            interaction.followups.append(message)
        if call.query.get("wait", "").lower() in ("true", "1"):
            return _Reply(200, message.to_json())
        return _Reply(204)

    # -- REST: channels and messages ---------------------------------------------------

    def _channel(self, channel_id: int) -> tuple[Channel, Guild]:
        for guild in self.guilds.values():
            channel = guild.channels.get(channel_id)
            if channel is not None:
                return channel, guild
        raise ApiError.of(404, ErrorCode.UNKNOWN_CHANNEL)

    def _bot_channel(self, call: Call, *needed: int) -> tuple[Channel, Guild, int]:
        channel, guild = self._channel(_int(call.params["channel_id"]))
        permissions = guild.permissions_in(channel, self.bot_user.id)
        if not permissions & Permission.VIEW_CHANNEL:
            raise ApiError.of(403, ErrorCode.MISSING_ACCESS)
        for bit in needed:
            if not permissions & bit:
                raise ApiError.of(403, ErrorCode.MISSING_PERMISSIONS)
        return channel, guild, permissions

    def _channel_message(self, call: Call, channel: Channel) -> Message:
        message = self.messages.get(_int(call.params["message_id"]))
        if (
            message is None
            or message.channel_id != channel.id
            or message.deleted
            or message.ephemeral
        ):
            raise ApiError.of(404, ErrorCode.UNKNOWN_MESSAGE)
        return message

    async def _get_channel(self, call: Call) -> _Reply:
        channel, _, _ = self._bot_channel(call)
        return _Reply(200, channel.to_json())

    async def _post_typing(self, call: Call) -> _Reply:
        self._bot_channel(call, Permission.SEND_MESSAGES)
        return _Reply(204)

    async def _get_messages(self, call: Call) -> _Reply:
        channel, _, _ = self._bot_channel(call, Permission.READ_MESSAGE_HISTORY)
        limit = int(call.query.get("limit", "50"))
        if not 1 <= limit <= 100:
            errors = _FormErrors()
            errors.add(
                ("limit",), "NUMBER_TYPE_MAX", "int value should be less than or equal to 100."
            )
            raise ApiError.form(errors)
        visible = sorted(self.messages_in(channel.id), key=lambda m: m.id, reverse=True)
        if "before" in call.query:
            visible = [m for m in visible if m.id < int(call.query["before"])]
        if "after" in call.query:
            visible = sorted(
                (m for m in visible if m.id > int(call.query["after"])), key=lambda m: m.id
            )
            visible = list(reversed(visible[:limit]))
        return _Reply(200, [m.to_json() for m in visible[:limit]])

    async def _get_message(self, call: Call) -> _Reply:
        channel, _, _ = self._bot_channel(call, Permission.READ_MESSAGE_HISTORY)
        return _Reply(200, self._channel_message(call, channel).to_json())

    async def _post_message(self, call: Call) -> _Reply:
        channel, guild, permissions = self._bot_channel(call, Permission.SEND_MESSAGES)
        body = call.json if isinstance(call.json, dict) else {}
        if call.files and not permissions & Permission.ATTACH_FILES:
            raise ApiError.of(403, ErrorCode.MISSING_PERMISSIONS)
        self._check_message(body, call.files, creating=True, guild=guild, channel_id=channel.id)
        nonce = body.get("nonce")
        if nonce is not None and body.get("enforce_nonce"):
            for earlier in self.messages.values():
                if (
                    earlier.nonce == nonce
                    and earlier.channel_id == channel.id
                    and not earlier.deleted
                ):
                    return _Reply(200, earlier.to_json())
        message = Message(
            id=self._ids(),
            channel_id=channel.id,
            guild_id=guild.id,
            author=self.bot_user,
            nonce=nonce,
        )
        reference = body.get("message_reference")
        if isinstance(reference, dict):
            referenced = self.messages.get(_int(str(reference.get("message_id", 0))))
            if referenced is None or referenced.deleted:
                if reference.get("fail_if_not_exists", True):
                    errors = _FormErrors()
                    message_text = "Unknown message"
                    errors.add(
                        ("message_reference",), "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", message_text
                    )
                    raise ApiError.form(errors)
            else:
                message.type = 19
                message.message_reference = {
                    "type": 0,
                    "channel_id": str(referenced.channel_id),
                    "message_id": str(referenced.id),
                    "guild_id": str(guild.id),
                }
        if not permissions & Permission.EMBED_LINKS:
            # Discord drops embeds silently without Embed Links.
            body = {**body, "embeds": []}
        self._fill(message, body, call.files, editing=False)
        self._add_message(message, guild)
        return _Reply(200, message.to_json())

    async def _patch_message(self, call: Call) -> _Reply:
        channel, guild, permissions = self._bot_channel(call)
        message = self._channel_message(call, channel)
        body = call.json if isinstance(call.json, dict) else {}
        if message.author.id != self.bot_user.id:
            only_flags = set(body) <= {"flags"}
            if not (only_flags and permissions & Permission.MANAGE_MESSAGES):
                raise ApiError.of(403, ErrorCode.CANNOT_EDIT_OTHERS_MESSAGE)
        self._check_message(body, call.files, creating=False, guild=guild, channel_id=channel.id)
        self._edit(message, body, call.files, "bot", call)
        return _Reply(200, message.to_json())

    async def _delete_message(self, call: Call) -> _Reply:
        channel, _, permissions = self._bot_channel(call)
        message = self._channel_message(call, channel)
        if message.author.id != self.bot_user.id and not permissions & Permission.MANAGE_MESSAGES:
            raise ApiError.of(403, ErrorCode.MISSING_PERMISSIONS)
        self._delete(message)
        return _Reply(204)

    # -- REST: guilds ------------------------------------------------------------------

    def _guild(self, call: Call) -> Guild:
        guild = self.guilds.get(_int(call.params["guild_id"]))
        if guild is None:
            raise ApiError.of(404, ErrorCode.UNKNOWN_GUILD)
        return guild

    async def _get_guild(self, call: Call) -> _Reply:
        counts = call.query.get("with_counts", "").lower() in ("true", "1")
        return _Reply(200, self._guild(call).to_json(counts=counts))

    async def _get_guild_channels(self, call: Call) -> _Reply:
        return _Reply(200, [c.to_json() for c in self._guild(call).channels.values()])

    async def _get_guild_roles(self, call: Call) -> _Reply:
        return _Reply(200, [r.to_json() for r in self._guild(call).roles.values()])

    async def _get_members(self, call: Call) -> _Reply:
        guild = self._guild(call)
        limit = int(call.query.get("limit", "1"))
        after = int(call.query.get("after", "0"))
        members = sorted(
            (m for m in guild.members.values() if m.user.id > after), key=lambda m: m.user.id
        )
        return _Reply(200, [m.to_json() for m in members[:limit]])

    async def _get_member(self, call: Call) -> _Reply:
        member = self._guild(call).members.get(_int(call.params["user_id"]))
        if member is None:
            raise ApiError.of(404, ErrorCode.UNKNOWN_MEMBER)
        return _Reply(200, member.to_json())

    # -- messages: checks and changes --------------------------------------------------

    def _check_message(
        self,
        body: JSON,
        files: list[Upload],
        *,
        creating: bool,
        guild: Guild | None,
        channel_id: int,
    ) -> None:
        limit = (guild.attachment_size_limit if guild else None) or self.attachment_size_limit
        if any(len(upload.data) > limit for upload in files):
            raise ApiError.of(413, ErrorCode.REQUEST_ENTITY_TOO_LARGE)
        errors = _FormErrors()
        content = body.get("content")
        if content is not None:
            errors.length(("content",), str(content), 0, 2000)
        if body.get("embeds") is not None:
            _check_embeds(body["embeds"], errors)
        flags = int(body.get("flags") or 0)
        if body.get("components") is not None:
            _check_components(body["components"], flags, errors)
        listed = body.get("attachments")
        count = len(files) if listed is None else max(len(listed), len(files))
        if count > 10:
            errors.add(("attachments",), "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        if errors:
            raise ApiError.form(errors)
        if creating and not (
            body.get("content")
            or body.get("embeds")
            or files
            or body.get("components")
            or body.get("sticker_ids")
            or body.get("poll")
        ):
            raise ApiError.of(400, ErrorCode.EMPTY_MESSAGE)

    def _fill(self, message: Message, body: JSON, files: list[Upload], *, editing: bool) -> None:
        if "content" in body:
            message.content = "" if body["content"] is None else str(body["content"])
        if "tts" in body and not editing:
            message.tts = bool(body["tts"])
        if "flags" in body and body["flags"] is not None:
            keep = message.flags & (MessageFlag.EPHEMERAL | MessageFlag.LOADING)
            settable = (
                MessageFlag.SUPPRESS_EMBEDS
                | MessageFlag.SUPPRESS_NOTIFICATIONS
                | MessageFlag.IS_COMPONENTS_V2
            )
            message.flags = keep | (int(body["flags"]) & settable)
            if (
                not editing
                and body["flags"] & MessageFlag.EPHEMERAL
                and message.webhook_id is not None
            ):
                message.flags |= MessageFlag.EPHEMERAL
        if "components" in body:
            message.components = _number_components(list(body["components"] or []))
        if "poll" in body and not editing:
            message.poll = body["poll"]
        if "attachments" in body or files:
            message.attachments = self._attachments(message, body, files, editing=editing)
        if "embeds" in body:
            message.embeds = [self._embed(e, message) for e in body["embeds"] or []]

    def _attachments(
        self, message: Message, body: JSON, files: list[Upload], *, editing: bool
    ) -> list[Attachment]:
        by_index: dict[int, Upload] = {}
        for number, upload in enumerate(files):
            found = re.fullmatch(r"files\[(\d+)\]", upload.field)
            by_index[int(found.group(1)) if found else number] = upload
        existing = {a.id: a for a in message.attachments}
        listed = body.get("attachments")
        result: list[Attachment] = []
        used: set[int] = set()
        if listed is None:
            result = list(message.attachments) if editing else []
        else:
            errors = _FormErrors()
            for position, entry in enumerate(listed):
                entry_id = _int(str(entry.get("id", "")))
                if entry_id in existing:
                    result.append(existing[entry_id])
                    continue
                chosen = by_index.get(entry_id)
                if chosen is None:
                    errors.add(
                        ("attachments", position, "id"),
                        "ATTACHMENT_NOT_FOUND",
                        "Unknown attachment",
                    )
                    continue
                used.add(entry_id)
                result.append(
                    self._store_attachment(
                        message.channel_id,
                        str(entry.get("filename") or chosen.filename),
                        chosen.data,
                        chosen.content_type,
                        ephemeral=message.ephemeral,
                        description=entry.get("description"),
                    )
                )
            if errors:
                raise ApiError.form(errors)
        for index in sorted(set(by_index) - used):
            upload = by_index[index]
            result.append(
                self._store_attachment(
                    message.channel_id,
                    upload.filename,
                    upload.data,
                    upload.content_type,
                    ephemeral=message.ephemeral,
                )
            )
        return result

    @staticmethod
    def _embed(embed: JSON, message: Message) -> JSON:
        """An embed as Discord stores it: typed, ``attachment://`` links resolved."""
        stored = {"type": "rich", **embed, "content_scan_version": 0}
        for key in ("image", "thumbnail"):
            media = stored.get(key)
            if isinstance(media, dict) and str(media.get("url", "")).startswith("attachment://"):
                name = str(media["url"]).removeprefix("attachment://")
                found = next((a for a in message.attachments if a.filename == name), None)
                if found is not None:
                    stored[key] = {
                        "url": found.url,
                        "proxy_url": found.proxy_url,
                        "width": found.width,
                        "height": found.height,
                        "content_type": found.content_type,
                        "flags": 0,
                    }
        return stored

    def _edit(
        self, message: Message, body: JSON, files: list[Upload], via: str, call: Call | None
    ) -> None:
        self._fill(message, body, files, editing=True)
        message.flags &= ~MessageFlag.LOADING
        message.edited_timestamp = _now()
        message.edits.append(
            Edit(time.monotonic(), via, dict(body), message.content, list(files), call)
        )
        self._message_updated(message)

    # -- CDN ---------------------------------------------------------------------------

    async def _cdn_get(self, request: web.Request) -> web.Response:
        gone = web.Response(status=404, text="This content is no longer available.")
        attachment = self.cdn.get(_int(request.match_info["id"]))
        if attachment is None or attachment.filename != request.match_info["name"]:
            return gone
        try:
            expires = int(request.query.get("ex", ""), 16)
            issued = int(request.query.get("is", ""), 16)
        except ValueError:
            return gone
        path = request.path.removeprefix("/media")
        signature = self._sign(path, expires, issued)
        if not hmac.compare_digest(signature, request.query.get("hm", "")):
            return gone
        if time.time() > min(expires, attachment.expires):
            return gone
        kind = attachment.content_type or "application/octet-stream"
        self.cdn_downloads.append(attachment.id)
        return web.Response(body=attachment.data, headers={"Content-Type": kind})

    # -- the gateway -------------------------------------------------------------------

    @staticmethod
    def _op(op: GatewayOp, data: Any) -> JSON:
        return {"op": int(op), "d": data, "s": None, "t": None}

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=2**20)
        await ws.prepare(request)
        query = dict(request.query)
        connection = GatewayConnection(
            path=request.path,
            query=query,
            opened_at=time.monotonic(),
            ws=ws,
            transport=request.transport,
            compress=query.get("compress") == "zlib-stream",
        )
        if connection.compress:
            connection._compressor = zlib.compressobj()
        self.connections.append(connection)
        self._notify()
        try:
            if query.get("v", str(API_VERSION)) not in ("9", "10"):
                await self._close(connection, CloseCode.INVALID_API_VERSION, "Invalid API version")
                return ws
            if query.get("encoding", "json") != "json":
                await self._close(
                    connection, CloseCode.DECODE_ERROR, "Error while decoding payload."
                )
                return ws
            hello = {
                "heartbeat_interval": int(self.heartbeat_interval * 1000),
                "_trace": ['["gateway-emulator"]'],
            }
            await connection.send(self._op(GatewayOp.HELLO, hello))
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    await self._close(
                        connection, CloseCode.DECODE_ERROR, "Error while decoding payload."
                    )
                    break
                await self._gateway_receive(connection, message.data)
        except ConnectionError as error:
            log.debug("gateway socket failed: %s", error)
        finally:
            await self._gateway_closed(connection)
        return ws

    async def _gateway_closed(self, connection: GatewayConnection) -> None:
        connection.closed = True
        code = connection.ws.close_code
        connection.close_code = code
        session = connection.session
        if session is not None and session.connection is connection:
            session.connection = None
            session._more.set()
            if code in (1000, 1001):
                # A client that closes normally ends its session (Discord's rule).
                session.invalidated = True
        writer = connection._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        self._notify()

    async def _close(self, connection: GatewayConnection, code: int, reason: str = "") -> None:
        if connection.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await connection.ws.close(code=code, message=reason.encode())

    async def _gateway_receive(self, connection: GatewayConnection, text: str) -> None:
        now = time.monotonic()
        connection.sends = [t for t in connection.sends if now - t < 60.0] + [now]
        if len(connection.sends) > GATEWAY_SEND_LIMIT:
            await self._close(connection, CloseCode.RATE_LIMITED, "Rate limited.")
            return
        try:
            payload = json.loads(text)
            op = GatewayOp(payload["op"])
        except (ValueError, KeyError, TypeError):
            await self._close(connection, CloseCode.DECODE_ERROR, "Error while decoding payload.")
            return
        self.calls.append(
            Call(
                method="GATEWAY",
                route=op.name,
                path=connection.path,
                params={},
                query=dict(connection.query),
                json=payload,
                files=[],
                headers={},
                time=now,
                status=101,
            )
        )
        self._notify()
        data = payload.get("d")
        if op == GatewayOp.HEARTBEAT:
            await connection.send(self._op(GatewayOp.HEARTBEAT_ACK, None))
        elif op == GatewayOp.IDENTIFY:
            await self._identify(connection, data if isinstance(data, dict) else {})
        elif op == GatewayOp.RESUME:
            await self._resume(connection, data if isinstance(data, dict) else {})
        elif connection.session is None:
            await self._close(connection, CloseCode.NOT_AUTHENTICATED, "Not authenticated.")
        elif op == GatewayOp.REQUEST_GUILD_MEMBERS:
            self._members_chunk(connection.session, data if isinstance(data, dict) else {})
        elif op not in (GatewayOp.PRESENCE_UPDATE, GatewayOp.VOICE_STATE_UPDATE):
            await self._close(connection, CloseCode.UNKNOWN_OPCODE, "Unknown opcode.")

    def _token_ok(self, token: Any) -> bool:
        return isinstance(token, str) and token.removeprefix("Bot ") == self.token

    async def _identify(self, connection: GatewayConnection, data: JSON) -> None:
        if connection.session is not None:
            await self._close(connection, CloseCode.ALREADY_AUTHENTICATED, "Already authenticated.")
            return
        if not self._token_ok(data.get("token")):
            await self._close(connection, CloseCode.AUTHENTICATION_FAILED, "Authentication failed.")
            return
        intents = data.get("intents")
        if not isinstance(intents, int) or intents < 0 or intents >= 1 << 26:
            await self._close(connection, CloseCode.INVALID_INTENTS, "Invalid intent(s).")
            return
        if intents & PRIVILEGED_INTENTS & ~self.allowed_intents:
            await self._close(connection, CloseCode.DISALLOWED_INTENTS, "Disallowed intent(s).")
            return
        shard = data.get("shard")
        shard_pair: tuple[int, int] | None = None
        if shard is not None:
            if not (isinstance(shard, list) and len(shard) == 2 and 0 <= shard[0] < shard[1]):
                await self._close(connection, CloseCode.INVALID_SHARD, "Invalid shard.")
                return
            shard_pair = (int(shard[0]), int(shard[1]))
        session = GatewaySession(id=secrets.token_hex(16), intents=intents, shard=shard_pair)
        self.sessions.append(session)
        guilds = [g for g in self.guilds.values() if session.has_guild(g.id)]
        ready: JSON = {
            "v": API_VERSION,
            "user_settings": {},
            "user": self._me(),
            "session_type": "normal",
            "session_id": session.id,
            "resume_gateway_url": self.resume_gateway_url,
            "relationships": [],
            "private_channels": [],
            "presences": [],
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["us-east", "us-central"],
            "game_relationships": [],
            "auth": {},
            "application": {"id": str(self.application_id), "flags": self._application_flags()},
            "_trace": ['["gateway-emulator"]'],
        }
        if shard_pair is not None:
            ready["shard"] = list(shard_pair)
        session.push("READY", ready)
        for guild in guilds:
            session.push("GUILD_CREATE", self._guild_create(guild, session))
        connection.identified = True
        self._attach(connection, session, 0)

    async def _resume(self, connection: GatewayConnection, data: JSON) -> None:
        session = next((s for s in self.sessions if s.id == data.get("session_id")), None)
        seq = data.get("seq")
        if (
            session is None
            or session.invalidated
            or not self._token_ok(data.get("token"))
            or not isinstance(seq, int | None)
            or (seq or 0) > session.seq
        ):
            await connection.send(self._op(GatewayOp.INVALID_SESSION, False))
            return
        old = session.connection
        if old is not None and old is not connection:
            old.session = None
            old.abort()
        connection.resumed = True
        self._attach(connection, session, seq or 0)
        session.push("RESUMED", {"_trace": ['["gateway-emulator"]']})

    def _attach(self, connection: GatewayConnection, session: GatewaySession, sent: int) -> None:
        connection.session = session
        connection.sent = sent
        session.connection = connection
        session._more.set()
        connection._writer = asyncio.get_running_loop().create_task(
            self._write_events(connection, session), name="discord-emulator-gateway-writer"
        )
        self._notify()

    async def _write_events(self, connection: GatewayConnection, session: GatewaySession) -> None:
        """Send a session's events from the connection's position on, in order."""
        while not connection.closed and session.connection is connection:
            if connection.sent < session.seq:
                event = session.events[connection.sent]
                if not await connection.send(event):
                    return
                connection.sent += 1
                self._notify()
                continue
            session._more.clear()
            await session._more.wait()

    def _members_chunk(self, session: GatewaySession, data: JSON) -> None:
        guild = self.guilds.get(_int(str(data.get("guild_id", ""))))
        if guild is None:
            return
        members = list(guild.members.values())
        if data.get("user_ids"):
            wanted = {int(u) for u in data["user_ids"]}
            members = [m for m in members if m.user.id in wanted]
        elif data.get("query"):
            query = str(data["query"]).lower()
            members = [m for m in members if m.user.username.lower().startswith(query)]
        limit = int(data.get("limit") or 0)
        if limit:
            members = members[:limit]
        chunk: JSON = {
            "guild_id": str(guild.id),
            "members": [m.to_json() for m in members],
            "chunk_index": 0,
            "chunk_count": 1,
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        if data.get("presences"):
            chunk["presences"] = []
        session.push("GUILD_MEMBERS_CHUNK", chunk)


_CALLBACKS_FOR: dict[int, set[CallbackType]] = {
    InteractionType.APPLICATION_COMMAND: {
        CallbackType.CHANNEL_MESSAGE_WITH_SOURCE,
        CallbackType.DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE,
        CallbackType.MODAL,
    },
    InteractionType.MESSAGE_COMPONENT: {
        CallbackType.CHANNEL_MESSAGE_WITH_SOURCE,
        CallbackType.DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE,
        CallbackType.DEFERRED_UPDATE_MESSAGE,
        CallbackType.UPDATE_MESSAGE,
        CallbackType.MODAL,
    },
    InteractionType.APPLICATION_COMMAND_AUTOCOMPLETE: {
        CallbackType.APPLICATION_COMMAND_AUTOCOMPLETE_RESULT
    },
    InteractionType.MODAL_SUBMIT: {
        CallbackType.CHANNEL_MESSAGE_WITH_SOURCE,
        CallbackType.DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE,
        CallbackType.DEFERRED_UPDATE_MESSAGE,
        CallbackType.UPDATE_MESSAGE,
    },
}
_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    500: "Internal Server Error",
}


class _TextReply(Exception):
    """A non-JSON answer (Cloudflare's, or an edge 5xx)."""

    def __init__(self, status: int, text: str, headers: Mapping[str, str]) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = dict(headers)


def _int(value: str) -> int:
    """A snowflake from a path; Discord answers 404 for ones that do not parse."""
    try:
        return int(value)
    except ValueError:
        return -1
