"""How an operation's GPU method is chosen when a call does not say: by its setter, else
by an environment variable read on first use, else the default (off until a GPU check
has shown the other way equal and faster)."""

from __future__ import annotations

import os


class Choice:
    """One operation's setting: ``methods[0]`` is the default; ``what`` names it in errors."""

    def __init__(self, what: str, env: str, methods: tuple[str, ...]) -> None:
        self.what, self.env, self.methods = what, env, methods
        self.chosen: str | None = None

    def check(self, method: object, source: str) -> str:
        if method not in self.methods:
            raise ValueError(f"The {self.what} ({source}) must be one of {list(self.methods)}. "
                             f"Got {method!r} instead.")
        return method  # type: ignore[return-value]

    def set(self, method: object, source: str) -> None:
        self.chosen = self.check(method, source)

    def get(self) -> str:
        if self.chosen is None:
            text = os.environ.get(self.env, "").strip() or self.methods[0]
            self.chosen = self.check(text, f"${self.env}")
        return self.chosen
