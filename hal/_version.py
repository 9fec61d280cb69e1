"""Version numbers, importable without torch (``hal --version`` reads them)."""
__version__ = "0.1.0"
CONTRACT_VERSION = "1.0"
