"""chatbus webui package."""
