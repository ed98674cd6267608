"""The item catalog: stable dense indices for item ids, their domains and their features.

Every array in metarec that is indexed by item (embeddings, popularity, scores) uses the
catalog's index. Items are numbered in order of first sight, so an index never changes and
new items simply extend the arrays.

>>> cat = Catalog()
>>> cat.add("i1", "books", ("topic:3",))
0
>>> cat.add("i2")
1
>>> cat.add("i1")  # known ids keep their index
0
>>> len(cat), cat.domain_of(0), cat.features_of(0)
(2, 'books', ('topic:3',))
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from metarec.core.events import DEFAULT_DOMAIN

__all__ = ["Catalog", "Vocabulary"]

IntArray = npt.NDArray[np.int64]


class Vocabulary:
    """A growable string → dense index map (domains, feature names).

    >>> v = Vocabulary(["a"])
    >>> v.index("b"), v.index("a"), v.get("zzz")
    (1, 0, -1)
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        for name in names:
            self.index(name)

    def index(self, name: str) -> int:
        """The index of ``name``, adding it if new."""
        idx = self._index.get(name)
        if idx is None:
            idx = len(self.names)
            self._index[name] = idx
            self.names.append(name)
        return idx

    def get(self, name: str) -> int:
        """The index of ``name``, or -1 if unknown (never adds)."""
        return self._index.get(name, -1)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index


class Catalog:
    """Item ids with their domain and feature strings, numbered in order of first sight.

    Metadata can arrive after the item itself (an item first seen in an event, described
    later on the items topic): :meth:`add` with features updates the record.
    """

    def __init__(self) -> None:
        self.ids = Vocabulary()
        self.domains = Vocabulary([DEFAULT_DOMAIN])
        self._domain: list[int] = []
        self._features: list[tuple[str, ...]] = []
        self._json: list[str] = []  # each id as a JSON string, for the lists' hot path
        #: Bumped whenever an item's features change, so derived tables know to refresh.
        self.revision = 0
        #: Bumped whenever an item moves to another domain.
        self.domain_revision = 0
        self._columns: tuple[tuple[int, int], dict[str, IntArray]] | None = None

    def add(
        self, item: str, domain: str | None = None, features: Sequence[str] | None = None
    ) -> int:
        """Register ``item`` (or update its metadata) and return its index."""
        idx = self.ids.index(item)
        if idx == len(self._domain):
            self._domain.append(self.domains.index(domain or DEFAULT_DOMAIN))
            self._features.append(tuple(features or ()))
            self._json.append(json.dumps(item, ensure_ascii=False))
            self.revision += 1
            return idx
        if domain is not None and self.domains.index(domain) != self._domain[idx]:
            self._domain[idx] = self.domains.index(domain)
            self.domain_revision += 1
        if features is not None and tuple(features) != self._features[idx]:
            self._features[idx] = tuple(features)
            self.revision += 1
        return idx

    def __len__(self) -> int:
        return len(self._domain)

    def get(self, item: str) -> int:
        return self.ids.get(item)

    def item_id(self, idx: int) -> str:
        return self.ids.names[idx]

    def json_ids(self, indices: Sequence[int]) -> str:
        """The ids of ``indices`` as the inside of a JSON array: ``"a","b"``."""
        quoted = self._json
        return ",".join([quoted[j] for j in indices])

    def domain_of(self, idx: int) -> str:
        return self.domains.names[self._domain[idx]]

    def features_of(self, idx: int) -> tuple[str, ...]:
        return self._features[idx]

    def domain_indices(self) -> IntArray:
        """Domain index of every item, as an array."""
        return np.asarray(self._domain, dtype=np.int64)

    def domain_columns(self) -> dict[str, IntArray]:
        """The item indices of every domain that has items, in catalogue order (cached
        until an item is added or moves).

        >>> cat = Catalog()
        >>> for item, domain in [("a", "books"), ("b", "music"), ("c", "books")]:
        ...     _ = cat.add(item, domain)
        >>> {d: cols.tolist() for d, cols in cat.domain_columns().items()}
        {'books': [0, 2], 'music': [1]}
        """
        key = (len(self._domain), self.domain_revision)
        if self._columns is None or self._columns[0] != key:
            of = self.domain_indices()
            order = np.argsort(of, kind="stable")
            present, starts = np.unique(of[order], return_index=True)
            parts = np.split(order, starts[1:]) if of.size else []
            names = self.domains.names
            columns = {names[d]: p for d, p in zip(present.tolist(), parts, strict=True)}
            self._columns = (key, columns)
        return self._columns[1]

    @property
    def features(self) -> list[tuple[str, ...]]:
        return self._features
