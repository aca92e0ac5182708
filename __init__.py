"""shardlm: private two-party LLM inference (client with the prompt, untrusted server with the hardware)."""

__version__ = "0.1.0"
