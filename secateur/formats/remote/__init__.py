"""Files that travel with exported models (self-contained: they import only transformers)."""
