"""seadragon-proxy: a priority-queue reverse proxy for Ollama."""

__version__ = "0.1.0"
