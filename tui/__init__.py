"""chatbus tui package."""
