"""chatbus gateway package."""
