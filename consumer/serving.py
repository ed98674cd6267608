"""What a consumer ranks with: the current model, its item tables, the catalog, popularity.

The catalog mirrors the item registry in Redis (same dense indices), so the tables grow by
appending rows when new items are registered, and are rebuilt only when a new model version
is loaded (hot reload).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from metarec.catalog import Catalog
from metarec.model import ItemTables, MetaModel
from metarec.popularity import ALL_DOMAINS, RecencyPopularity

__all__ = ["Serving"]

F32 = npt.NDArray[np.float32]


class Serving:
    """The model-side state of one consumer process.

    >>> s = Serving(half_life_ms=1000.0)
    >>> s.add_items([(0, "i0", "books", ("topic:1",)), (1, "i1", "music", ())])
    >>> s.version, len(s.catalog), s.tables is None
    (0, 2, True)
    """

    def __init__(self, half_life_ms: float) -> None:
        self.catalog = Catalog()
        self.model: MetaModel | None = None
        self.tables: ItemTables | None = None
        self.popularity = RecencyPopularity(half_life_ms)
        self._item_domain = np.zeros(0, np.int64)

    @property
    def version(self) -> int:
        """The served model version; 0 before any model exists (popularity only)."""
        return 0 if self.model is None else self.model.version

    def set_model(self, model: MetaModel) -> None:
        """Serve ``model`` from now on (a hot reload rebuilds the item tables once)."""
        self.model = model
        self.tables = model.item_tables(self.catalog)

    def add_items(self, rows: Iterable[tuple[int, str, str, tuple[str, ...]]]) -> None:
        """Mirror registry rows ``(index, item, domain, features)``, in index order."""
        start = len(self.catalog)
        changed = False
        for index, item, domain, features in rows:
            known = index < len(self.catalog)
            got = self.catalog.add(item, domain, features)
            if got != index:
                raise ValueError(f"registry index {index} of item {item!r} does not match the "
                                 f"local catalog ({got}); rows must arrive in index order")
            changed |= known
        self._item_domain = self.catalog.domain_indices()
        if self.model is None:
            return
        if changed or self.tables is None:
            self.tables = self.model.item_tables(self.catalog)
        elif len(self.catalog) > start:
            self.tables = self.tables.extend(self.model.item_tables(self.catalog, start))

    def item_domains(self) -> npt.NDArray[np.int64]:
        return self._item_domain

    def trend(self, ts: int) -> F32:
        """``β·log(1 + p)`` over the catalog at time ``ts`` (zero weight before a model)."""
        pop = self.popularity.scores(ALL_DOMAINS, ts, len(self.catalog))
        beta = 0.0 if self.model is None else self.model.trend
        return (beta * np.log1p(pop)).astype(np.float32)
