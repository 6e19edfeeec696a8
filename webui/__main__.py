"""`python -m webui --nats URL --host H --port P`: serve the web app."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

from bus import add_nats_option, resolve_nats, setup_logging
from webui.config import Limits, WebConfig


def _state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "chatbus" / "webui"


def _secret(state_dir: Path, name: str = "cookie-secret") -> str:
    """A per-installation secret (the cookie's, the admins' token), made once, so it survives restarts."""
    path = state_dir / name
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def parse(argv: list[str] | None = None) -> WebConfig:
    p = argparse.ArgumentParser(prog="python -m webui", description="The chatbus web app (NiceGUI).")
    add_nats_option(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--state-dir", type=Path, default=_state_dir(), help="browser sessions and the cookie secret"
    )
    p.add_argument("--title", default="chatbus")
    p.add_argument("--max-tokens", type=int, default=512, help="default answer length")
    p.add_argument(
        "--user-rpm", type=int, default=Limits.user_per_minute, help="answers per minute per browser"
    )
    p.add_argument(
        "--model-rpm", type=int, default=Limits.model_per_minute, help="answers per minute per model"
    )
    p.add_argument("--max-input-chars", type=int, default=Limits.max_input_chars, help="longest message")
    p.add_argument(
        "--votes-per-hour", type=int, default=Limits.votes_per_hour, help="battle votes per hour per browser"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    level = logging.DEBUG if a.verbose else logging.INFO
    setup_logging(level, os.environ.get("CHATBUS_LOG_FORMAT"), "%(asctime)s %(name)s %(message)s")
    return WebConfig(
        nats=resolve_nats(a.nats, os.environ),
        host=a.host,
        port=a.port,
        storage_secret=os.environ.get("CHATBUS_WEB_SECRET") or _secret(a.state_dir),
        limits=Limits(
            user_per_minute=a.user_rpm,
            model_per_minute=a.model_rpm,
            max_input_chars=a.max_input_chars,
            votes_per_hour=a.votes_per_hour,
        ),
        default_max_tokens=a.max_tokens,
        title=a.title,
        state_dir=a.state_dir,
        # Admins sign in on the Usage page with this token; credentials travel in the environment only.
        admin_token=os.environ.get("CHATBUS_WEB_ADMIN_TOKEN") or _secret(a.state_dir, "admin-token"),
        usage_nats=os.environ.get("CHATBUS_WEB_USAGE_NATS", ""),
    )


def main() -> int:
    config = parse()
    assert config.state_dir is not None
    # NiceGUI reads its storage folder at import: point it into our state dir first.
    os.environ.setdefault("NICEGUI_STORAGE_PATH", str(config.state_dir / "sessions"))
    # NiceGUI switches to its screen-test mode when it sees pytest's variables; a process started as
    # `python -m webui` is always the real app, even when a test suite started it.
    for name in [n for n in os.environ if n.startswith("PYTEST_")]:
        del os.environ[name]
    from webui.app import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
