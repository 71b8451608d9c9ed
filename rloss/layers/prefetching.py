"""What the data layers that read ahead share (ImageSegData, ImageData, DenseImageData, Data).

Each walks its dataset with an object of its own (`walk`: the sample order of a list file, the
cursor of an LMDB database) that has `count`, `state()` and `set_state()`, and reads batches ahead
with a `Prefetcher` planned from that walk. Resuming, data-parallel sharding, the waiting time and
closing depend only on that, and are written here once.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, ClassVar, Sequence

from rloss.data.prefetch import Prefetcher
from rloss.layers.data import DataShare, SourceLayer


def _close(prefetcher: Prefetcher, then: Callable[[], None] | None) -> None:
    prefetcher.close()
    if then is not None:
        then()


class PrefetchingSource(SourceLayer):
    """A source layer whose batches a Prefetcher reads ahead from `self.walk` (see the module)."""

    has_data_state: ClassVar[bool] = True

    def start_prefetching(self, walk: Any, planner: Callable[[DataShare], Callable[[], Sequence[Any]]],
                          load: Callable[[Any], Any], depth: int, then_close: Callable[[], None] | None = None) -> None:
        """Read ahead `depth` batches: `planner(share)` gives the function that plans the next batch's
        items from `walk` for this rank's share, `load` makes each item. `then_close` runs after the
        loaders stop (at `close`, or when the layer is collected)."""
        self.walk = walk
        self.share = DataShare()
        self.prefetcher = Prefetcher(planner(self.share), load, depth=depth, name=f"rloss-data-{self.name}",
                                     capture=walk.state)
        self._close = weakref.finalize(self, _close, self.prefetcher, then_close)

    def dataset_words(self) -> str:
        """The dataset in words, for messages: "the list 'train.txt'"."""
        raise NotImplementedError

    def consumed_state(self) -> Any:
        """The walk's state after the batches `forward` has returned (the read-ahead is not counted)."""
        return self.prefetcher.consumed_state()

    def continue_from(self, state: Any) -> None:
        """Continue the walk from `state`: the batches read ahead are dropped and planned again."""
        self.walk.set_state(state)
        self.prefetcher.restart()

    def shard(self, rank: int, ranks: int) -> None:
        """Read only the batches `rank`, `rank + ranks`, ... of the one-process sequence (data-parallel
        training, rloss's rule for every data layer: Caffe's Data layer deals single records round robin)."""
        DataShare(rank, ranks).check(-(-self.walk.count // self.batch_size), f"{self.who}: {self.dataset_words()}")
        self.share.rank, self.share.ranks = rank, ranks
        self.continue_from(self.consumed_state())

    @property
    def data_wait_seconds(self) -> float:
        """Total time `forward` has been blocked waiting for the background loaders."""
        return self.prefetcher.waited_seconds

    def close(self) -> None:
        """Stop the background loaders (also done when the layer is garbage-collected)."""
        self._close()
