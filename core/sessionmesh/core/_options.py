"""How a proxy calls: the options a caller gives a proxy and a tool gives its dependencies."""

from __future__ import annotations

import dataclasses
from typing import Any

from sessionmesh.errors import UsageError


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyOptions:
    """How a proxy calls. Every field has an effect; see ``Proxy``."""

    session_required: bool = False
    stateful: bool = False
    auto_session_management: bool = True
    timeout: float | None = None
    retry_count: int = 0
    retry_delay: float = 0.5
    streaming: bool = False
    stream_timeout: float | None = None
    buffer_size: int = 64

    def __post_init__(self) -> None:
        if self.retry_count < 0:
            raise UsageError("retry_count must be >= 0")
        if self.retry_delay < 0:
            raise UsageError("retry_delay must be >= 0 seconds")
        if self.buffer_size < 1:
            raise UsageError("buffer_size must be >= 1 (chunks in flight)")
        for name in ("timeout", "stream_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be > 0 seconds, or None")

    @property
    def auto_session(self) -> bool:
        return self.session_required and self.auto_session_management

    def replace(self, **changes: Any) -> ProxyOptions:
        """These options with ``changes``; an unknown name is a UsageError."""
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as exc:
            raise UsageError(f"unknown proxy option: {exc}") from None
