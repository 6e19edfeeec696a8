"""chatbus judge package."""
