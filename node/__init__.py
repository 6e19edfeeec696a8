"""chatbus node package."""
