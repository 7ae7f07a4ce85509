"""ptutils: PyTorch experiments as explicit state machines with pluggable storage."""

from .database import DBInterface, open_db
from .errors import PtutilsError

__version__ = "0.1.0"

__all__ = ["DBInterface", "PtutilsError", "open_db", "__version__"]
