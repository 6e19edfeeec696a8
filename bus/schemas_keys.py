"""Wire records of API keys: a key's limits (`cb_keys`) and its usage per day and model (`cb_usage`)."""

from __future__ import annotations

import msgspec

from bus.schemas import _Tagged

__all__ = ["KeyRecord", "KeyUsage"]


class KeyRecord(_Tagged, frozen=True, kw_only=True, tag="key.record"):
    """One API key, under its name. Only the sha256 of the secret is kept; limits 0 mean none.

    A revoked key stays as a record (revoked=True), so every gateway learns of it from the watch.
    """

    name: str
    sha256: str  # hex digest of the secret
    rpm: int = 0  # requests per minute
    tpm: int = 0  # prompt + completion tokens per minute
    max_streams: int = 0  # requests in flight at once
    models: list[str] = msgspec.field(default_factory=list)  # empty: every model
    created_at: float = 0.0
    expires_at: float = 0.0  # unix seconds; 0: never
    revoked: bool = False

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires_at == 0 or now < self.expires_at)


class KeyUsage(_Tagged, frozen=True, kw_only=True, tag="key.usage"):
    """What one key used of one model on one UTC day."""

    key: str
    model: str
    day: str  # YYYY-MM-DD
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
