"""A netmsgserver's proxy tables, indexed both ways: `Indexed`.

A proxy is a local port standing for a port of another host; its route is where that
port lives (host, network id). The server keeps `proxy_ref` (proxy name -> route) and
`proxies` (route or alias reference -> proxy name), and looks both up the other way
whenever something happens to a remote port or a proxy: it died (DEAD), it moved on
(MOVED: hold and flush), it is full (CHOKE), a proxy is forgotten (the references
naming it go). Found by walking every entry, a host that ended with 10,000 exported
ports cost the others 10,000 walks of 10,000 proxies; the index makes each a lookup.

`Indexed` is a dict key -> value (reads are the dict's own) that also keeps value ->
keys. Invariant: `k in self.keys_of(v)` iff `self[k] == v`. Only
`[k] = v`, `del`, `setdefault`, `remove` and `discard` change it (the dict's other
mutating methods raise). The netmsgserver loop's own state.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NoReturn, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=Hashable)


class Indexed(dict[K, V]):
    """A dict with the keys of each value (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: dict[V, dict[K, None]] = {}

    def __setitem__(self, key: K, value: V) -> None:
        if key in self:
            if self[key] == value:
                return
            self._unindex(key, self[key])
        super().__setitem__(key, value)
        self._keys.setdefault(value, {})[key] = None

    def __delitem__(self, key: K) -> None:
        self._unindex(key, self[key])
        super().__delitem__(key)

    def setdefault(self, key: K, value: V) -> V:
        """dict.setdefault, indexed."""
        if key not in self:
            self[key] = value
        return self[key]

    def remove(self, key: K) -> V:
        """Delete `key` and return its value (KeyError if it has none)."""
        value = self[key]
        del self[key]
        return value

    def discard(self, key: K) -> None:
        """Delete `key` if it is there."""
        if key in self:
            del self[key]

    def keys_of(self, value: V) -> list[K]:
        """The keys whose value is `value`, in the order they took it."""
        return list(self._keys.get(value, ()))

    def keys_where(self, match: Callable[[V], bool]) -> list[K]:
        """The keys whose value `match`es (a walk of the distinct values)."""
        return [k for v, keys in self._keys.items() if match(v) for k in keys]

    def _unindex(self, key: K, value: V) -> None:
        keys = self._keys[value]
        del keys[key]
        if not keys:
            del self._keys[value]

    def _refused(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("an Indexed dict changes only by [k] = v, del, setdefault, "
                        "remove and discard")

    pop = update = popitem = clear = __ior__ = _refused
