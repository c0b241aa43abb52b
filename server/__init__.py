"""refusal-gateway: the gateway layer that runs inside vLLM's OpenAI server."""

__version__ = "0.1.0"
