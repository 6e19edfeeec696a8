"""chatbus trainer package."""
