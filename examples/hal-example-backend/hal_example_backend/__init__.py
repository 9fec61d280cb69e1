"""A minimal HAL backend plugin (the README's worked example)."""
