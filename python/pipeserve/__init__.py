"""pipeserve: a compact LLM serving engine built around asynchronous pipeline-parallel communication."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pipeserve.frontend.offline import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":  # imported lazily: `import pipeserve` stays light
        from pipeserve.frontend.offline import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine"]
