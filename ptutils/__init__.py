"""ptutils: PyTorch experiments as explicit state machines with pluggable storage."""

from .config import Config
from .data import DataProvider, DatasetProvider
from .database import DBInterface, open_db
from .errors import PtutilsError
from .model import Model
from .nest import Tuning
from .records import SessionView, load_weights, session_record, sessions
from .session import Session
from .update import Monitor

__version__ = "0.1.0"

__all__ = [
    "Config", "DBInterface", "DataProvider", "DatasetProvider", "Model", "Monitor", "PtutilsError", "Session",
    "SessionView", "Tuning", "load_weights", "open_db", "session_record", "sessions", "__version__",
]
