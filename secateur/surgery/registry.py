"""Registers secateur's own config/model classes with the Auto classes (filled in by surgery)."""
