"""pipeserve: a compact LLM serving engine built around asynchronous pipeline-parallel communication."""

__version__ = "0.1.0"
