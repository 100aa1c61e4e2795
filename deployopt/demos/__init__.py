"""Small model definitions for the bundled demonstrations (importable as factories)."""
