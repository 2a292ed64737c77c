"""The acs-serve inference server (FastAPI)."""

__version__ = "0.1.0"
