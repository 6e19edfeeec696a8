"""The web app's settings, parsed once in `__main__` and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Limits", "WebConfig"]


@dataclass(frozen=True)
class Limits:
    """Abuse limits; every one of them tells the user what happened and when to try again."""

    user_per_minute: int = 30  # answers one browser may ask for per minute (side-by-side counts 2)
    model_per_minute: int = 240  # answers one model gives per minute across all users
    max_input_chars: int = 8000  # one message
    max_conversation_chars: int = 60000  # a whole conversation sent to a model
    votes_per_hour: int = 60  # arena and side-by-side votes one browser may cast an hour (ballot stuffing)


@dataclass(frozen=True)
class WebConfig:
    nats: str
    host: str = "127.0.0.1"
    port: int = 8080
    storage_secret: str = "chatbus-dev-secret"
    limits: Limits = field(default_factory=Limits)
    default_max_tokens: int = 512
    title: str = "chatbus"
    state_dir: Path | None = None  # where browser sessions (conversations) are kept
    admin_token: str = ""  # signs a browser in as an admin (the Usage page); empty: nobody can
    usage_nats: str = ""  # a bus URL whose credential may read the key and usage buckets (else `nats`)
