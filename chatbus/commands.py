"""The operator commands `chatbus` adds to itself: `keys` (admin credential by default), `top` and
`adapters`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_commands"]


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    from chatbus.adapters_cli import add_parser as add_adapters
    from chatbus.keys_cli import add_parser
    from chatbus.top import add_parser as add_top

    add_parser(sub, common)
    add_top(sub, common)
    add_adapters(sub, common)
