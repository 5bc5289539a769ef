"""A bounded memory of ids: the latest ``limit`` added, the oldest forgotten first."""

from __future__ import annotations

from collections import OrderedDict


class RecentIds:
    """Ids remembered for a while (jobs cancelled, finished, prompts interrupted): at
    most ``limit``; adding one again makes it the newest."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        self._ids[key] = None
        self._ids.move_to_end(key)
        while len(self._ids) > self._limit:
            self._ids.popitem(last=False)

    def discard(self, key: str) -> None:
        self._ids.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)
