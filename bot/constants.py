"""Constants of the bot that are not configuration, each with its reason."""

from __future__ import annotations

#: Discord's per-file upload limit since 2025-01, when an interaction did not say.
DEFAULT_ATTACHMENT_LIMIT = 10 * 2**20
#: Longest prompt the command accepts; the workflow's own limit is checked at admission.
PROMPT_MAX_LENGTH = 1500
#: Longest negative prompt the command accepts.
NEGATIVE_MAX_LENGTH = 1000
#: Largest seed: workflows draw seeds up to 2**53 - 1 (a JSON-safe integer).
SEED_MAX = 2**53 - 1
#: Images per job a user may ask for (a 2x2 grid at most).
COUNT_MAX = 4
#: Seconds a render is assumed to take before the bot has seen one finish (for ETAs).
DEFAULT_RENDER_SECONDS = 20.0
#: While a job waits, its position is read again this often (no event says it moved).
POSITION_REFRESH_SECONDS = 10.0
#: Messages being edited at once; more wait their turn instead of piling up requests.
CONCURRENT_EDITS = 16
#: Seconds one edit may take (discord.py's 429 sleeps included) before it is given up.
EDIT_TIMEOUT_SECONDS = 60.0
#: A rate limit longer than this raises instead of sleeping: the frame is stale by then.
MAX_RATELIMIT_SLEEP_SECONDS = 10.0
#: Cells of the progress bar.
PROGRESS_CELLS = 12
#: Discord's limits: choices per autocomplete answer; characters of message content.
MAX_CHOICES = 25
MAX_CONTENT = 2000
#: Characters of the prompt quoted in progress and result messages.
PROMPT_SHOWN = 300
#: Seconds between progress edits of a message over an hour old: Discord caps those
#: edits (30046), and the final edit must still get through.
OLD_MESSAGE_INTERVAL_SECONDS = 30.0
#: Longest model file name an option takes (manifests bound file names at 255).
MODEL_NAME_MAX_LENGTH = 255
