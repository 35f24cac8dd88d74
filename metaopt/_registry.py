"""A case-insensitive ``name -> factory`` table: the shared core of :mod:`metaopt.optim.registry`
and :mod:`metaopt.tasks.registry`.

Example:
    >>> reg = Registry("widget")
    >>> @reg.register("Box")
    ... def box(size=1):
    ...     return ("box", size)
    >>> reg.get("box", size=2), reg.names(), reg.factory("BOX") is box
    (('box', 2), ['box'], True)
    >>> reg.get("ball")
    Traceback (most recent call last):
    ValueError: Unknown widget name: 'ball'; known names: box
    >>> reg.register("box", box)
    Traceback (most recent call last):
    ValueError: widget name 'box' is already registered (pass replace=True to replace it)
    >>> reg.unregister("box"); reg.names()
    []
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Optional, TypeVar, Union, overload

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Factories by lower-cased name; ``kind`` ("optimizer", "task") names them in errors.

    ``builtins(registry)``, if given, registers the built-in entries; it runs once, before the
    first :meth:`register`, :meth:`names` or :meth:`get` (so their imports stay lazy).
    """

    def __init__(self, kind: str, builtins: Optional[Callable[[Registry[T]], None]] = None) -> None:
        self.kind = kind
        #: the table itself (lower-cased name -> factory).
        self.factories: dict[str, Callable[..., T]] = {}
        self._builtins = builtins

    def _load_builtins(self) -> None:
        load, self._builtins = self._builtins, None
        if load is not None:
            load(self)

    @overload
    def register(self, name: str, factory: F, *, replace: bool = ...) -> F: ...

    @overload
    def register(self, name: str, factory: None = ..., *, replace: bool = ...) -> Callable[[F], F]: ...

    def register(
        self, name: str, factory: Optional[F] = None, *, replace: bool = False
    ) -> Union[F, Callable[[F], F]]:
        """Register ``factory`` under ``name`` (lower case); without ``factory``, a decorator.

        Raises:
            ValueError: ``name`` is taken and ``replace`` is false.
        """
        if factory is None:
            return lambda f: self.register(name, f, replace=replace)
        self._load_builtins()
        key = name.lower()
        if key in self.factories and not replace:
            raise ValueError(f"{self.kind} name {key!r} is already registered (pass replace=True to replace it)")
        self.factories[key] = factory
        return factory

    def names(self) -> list[str]:
        """Sorted list of the registered names."""
        self._load_builtins()
        return sorted(self.factories)

    def factory(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name`` (case-insensitive), not called.

        Raises:
            ValueError: unknown name (the message lists the known ones).
        """
        self._load_builtins()
        if not isinstance(name, str) or name.lower() not in self.factories:
            raise ValueError(f"Unknown {self.kind} name: {name!r}; known names: {', '.join(self.names())}")
        return self.factories[name.lower()]

    def unregister(self, name: str) -> None:
        """Remove ``name`` (case-insensitive); built-ins can be removed too.

        Raises:
            ValueError: unknown name (the message lists the known ones).
        """
        self.factory(name)  # raises for an unknown name
        del self.factories[name.lower()]

    def get(self, name: str, **kwargs: Any) -> T:
        """``factory(**kwargs)`` for the factory registered under ``name`` (case-insensitive).

        Raises:
            ValueError: unknown name (the message lists the known ones), or a ``TypeError``
                from the factory (e.g. an unexpected keyword), re-raised as a bad value.
        """
        factory = self.factory(name)
        try:
            return factory(**kwargs)
        except TypeError as e:  # unexpected keyword: report it as a bad config value
            raise ValueError(f"Invalid arguments for {self.kind} {name!r}: {e}") from e
