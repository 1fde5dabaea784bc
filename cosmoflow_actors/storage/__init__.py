"""Storage backends: the Storage ABC and the built-in memory and file backends."""

from cosmoflow_actors.storage.base import Storage
from cosmoflow_actors.storage.file import FileStorage
from cosmoflow_actors.storage.memory import MemoryStorage

__all__ = ["FileStorage", "MemoryStorage", "Storage"]
