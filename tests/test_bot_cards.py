"""What a job's message says, state by state (pure functions: no Discord)."""

from __future__ import annotations

import io

from PIL import Image

from bot import cards
from jobs.models import Failed, FailureReason, Job, Origin


def _job(**params: int) -> Job:
    return Job(
        workflow="demo",
        lane="fast",
        params={"prompt": "a *bold* @everyone fox", "seed": 5, "batch": 1, **params},
        origin=Origin(frontend="discord", reply_to="bot", tenant="1", user="42"),
        idempotency_key="k",
    )


def _png(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 64 + seed).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def test_every_failure_reason_has_its_own_words() -> None:
    job = _job()
    texts = set()
    for reason in FailureReason:
        event = Failed(
            job_id=job.job_id, attempt=1, worker_id="w", seq=1, reason=reason, message="m"
        )
        content = cards.failed(job, event).content
        assert cards.FAILURE_TEXT[reason] in content
        texts.add(cards.FAILURE_TEXT[reason])
        assert ("not charged" in content) is (reason is not FailureReason.CANCELLED)
    assert len(texts) == len(FailureReason)


def test_the_prompt_is_escaped_and_nobody_is_pinged() -> None:
    header = cards.header(_job())
    assert "\\*bold\\*" in header
    assert "@everyone" not in header
    assert "<@42>" in header  # shown, and AllowedMentions.none() keeps it silent
    assert cards.NO_MENTIONS.everyone is False and cards.NO_MENTIONS.users is False


def test_progress_bar() -> None:
    assert cards.bar(0, 20).startswith("░" * 12)
    assert cards.bar(10, 20) == "█" * 6 + "░" * 6 + " 50%"
    assert cards.bar(25, 20).startswith("█" * 12) and cards.bar(25, 20).endswith("100%")


def test_a_grid_fits_the_limit() -> None:
    images = [_png(512, 512, n) for n in range(4)]
    roomy = cards.compose(images, 10 * 2**20)
    assert roomy.filename == "result.png"
    assert Image.open(io.BytesIO(roomy.data)).size == (1024, 1024)
    tight = cards.compose(images, 60_000)
    assert tight.filename == "result.jpg" and len(tight.data) <= 60_000
    single = cards.compose(images[:1], 10 * 2**20)
    assert Image.open(io.BytesIO(single.data)).size == (512, 512)
