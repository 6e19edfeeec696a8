"""chatbus chatbus package."""
