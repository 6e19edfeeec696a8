"""Per-user and per-model rate limits (token buckets) and input length checks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from webui.config import Limits

__all__ = ["LimitExceeded", "RateLimiter"]


class LimitExceeded(Exception):
    """A limit the user hit; `str(e)` is the message to show them."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets refilled continuously: `per_minute` requests, bursts up to `per_minute`."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def check_input(self, text: str, conversation_chars: int = 0) -> None:
        if not text.strip():
            raise LimitExceeded("Type a message first.")
        if len(text) > self.limits.max_input_chars:
            raise LimitExceeded(
                f"Your message is {len(text):,} characters; the limit is {self.limits.max_input_chars:,}. "
                "Shorten it or split it into several messages."
            )
        if conversation_chars + len(text) > self.limits.max_conversation_chars:
            raise LimitExceeded(
                f"This conversation is too long ({conversation_chars + len(text):,} characters, limit "
                f"{self.limits.max_conversation_chars:,}). Start a new chat to go on."
            )

    def acquire(self, user: str, models: list[str]) -> None:
        """Take one request for `user` and one per model, or raise without taking any."""
        now = self._clock()
        wants = [("user", user, self.limits.user_per_minute, len(models))]
        wants += [("model", m, self.limits.model_per_minute, 1) for m in models]
        for kind, key, per_minute, n in wants:
            wait = self._wait(kind, key, per_minute, n, now)
            if wait > 0:
                raise LimitExceeded(self._message(kind, key, per_minute, wait), wait)
        for kind, key, _per_minute, n in wants:
            self._buckets[kind, key].tokens -= n

    def vote(self, user: str) -> None:
        """Take one of `user`'s votes for this hour, or raise saying when the next one counts."""
        per_hour = self.limits.votes_per_hour
        wait = self._wait("vote", user, per_hour, 1, self._clock() / 60.0)  # minutes as the bucket's seconds
        if wait > 0:
            raise LimitExceeded(
                f"You have reached the limit of {per_hour} vote{'s' if per_hour != 1 else ''} an hour. "
                f"Votes count again in {math.ceil(wait)} min; you can keep chatting meanwhile.",
                wait * 60.0,
            )
        self._buckets["vote", user].tokens -= 1

    def _wait(self, kind: str, key: str, per_minute: int, n: int, now: float) -> float:
        bucket = self._buckets.get((kind, key))
        if bucket is None:
            bucket = self._buckets[kind, key] = _Bucket(float(per_minute), now)
        bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.updated) * per_minute / 60.0)
        bucket.updated = now
        missing = n - bucket.tokens
        return 0.0 if missing <= 0 else missing * 60.0 / per_minute

    @staticmethod
    def _message(kind: str, key: str, per_minute: int, wait: float) -> str:
        if kind == "user":
            return (
                f"You're sending messages too fast (limit: {per_minute} answers a minute). "
                f"Try again in {math.ceil(wait)} s."
            )
        return (
            f"{key} is busy: it has reached its limit of {per_minute} answers a minute for everyone. "
            f"Try again in {math.ceil(wait)} s or pick another model."
        )
