"""A tiny name -> factory registry, so that components are added with a decorator, not an if/elif chain."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from featup.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories of one kind of component (``backbone``, ``upsampler``, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``factory`` under ``name``; a second registration of a name is an error."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``, or a ConfigError listing the known names."""
        try:
            return self._factories[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; expected one of {', '.join(sorted(self._factories))}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
