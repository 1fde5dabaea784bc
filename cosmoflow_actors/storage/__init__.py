"""Storage backends: the Storage ABC and the built-in memory, file, SQLite and Redis ones."""

from cosmoflow_actors.storage.base import Storage
from cosmoflow_actors.storage.codec import CodecName
from cosmoflow_actors.storage.file import FileStorage
from cosmoflow_actors.storage.memory import MemoryStorage
from cosmoflow_actors.storage.redis import RedisStorage
from cosmoflow_actors.storage.sqlite import SQLiteStorage

__all__ = ["CodecName", "FileStorage", "MemoryStorage", "RedisStorage", "SQLiteStorage", "Storage"]
