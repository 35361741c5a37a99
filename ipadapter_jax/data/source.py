"""What a training source is (``Source``), and the one implementation the webdataset, TFDS and latent-cache
sources share (``BatchSource``): a record reader and a decode function, composed.

A reader (``webdataset_source.ShardReader``, ``tfds_source.TfdsReader``) yields this process's raw records in
order, each with the reader's position once it is consumed, and starts again from any such position; a decode
function turns one record into an example or the name of the reason to skip it; a collator stacks examples
into a local batch. ``BatchSource`` does the rest, once: decoding ahead in threads without letting the state
run ahead of the emitted batches, the counters, the resumable state with the fingerprint that refuses a state
saved for other data or another process layout, and closing.

Resume: ``get_state()`` holds the position after the last record that went into an emitted batch, the number
of batches emitted (it seeds conditioning dropout) and the counters; a source built with that ``state`` reads
on from there, so its batches equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ipadapter_jax.data.counters import SampleCounters
from ipadapter_jax.data.shards import resolve_process


@runtime_checkable
class Source(Protocol):
    """An iterator of local batches (dicts of numpy arrays plus ``counters``) that can be resumed exactly."""

    counters: SampleCounters
    local_batch_size: int

    def __iter__(self) -> Iterator[dict]: ...

    def __next__(self) -> dict: ...

    def get_state(self) -> dict:
        """JSON-serialisable position after the last emitted batch (pass it as ``state=`` to resume)."""

    @property
    def batches_emitted(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Record:
    """One raw record: ``position`` is the reader's position once it is consumed (epoch first)."""

    position: tuple[int, ...]
    payload: Any = None  # the raw sample (member name -> bytes, a TFDS element, ...)
    key: str = ""  # the example's key, for debugging
    rng_path: tuple[int, ...] = ()  # with the seed, what this record's random crop draws from (``record_rng``)
    shard_end: bool = False  # the end of a shard (no payload); counted in ``shards_finished``
    failure: str | None = None  # at a shard end: why the shard stopped early (a skip reason), if it did


def record_rng(seed: int, record: Record) -> np.random.Generator:
    """The random crop's generator for ``record``: a function of the seed and the record's place only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *record.rng_path, 0x5EED]))


def process_share(global_batch_size: int, process_index: int | None, process_count: int | None
                  ) -> tuple[int, int, int]:
    """``(process_index, process_count, local_batch_size)``; process defaults from ``jax``."""
    process_index, process_count = resolve_process(process_index, process_count)
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    if global_batch_size < process_count:
        raise ValueError("global_batch_size must be >= process_count")
    return process_index, process_count, global_batch_size // process_count


class BatchSource:
    """Local batches of ``local_batch_size`` examples: records from ``reader``, each turned into an example
    (or a skip reason) by ``decode(record)``, stacked by ``collator(examples, step, process_index)``.

    ``reader``: ``records(start_position)`` iterates from a position; ``position_fields`` name a position's
    entries in the state, ``state_format`` tags it, ``fingerprint()`` is what a position is only valid for
    (with the process layout and batch size), ``description`` names the data in messages.

    ``num_decode_threads``: threads decoding ahead of the consumer (0: decode inline, on demand);
    ``lookahead``: records read and decoded ahead when threaded (default two local batches); ``state``: a
    ``get_state()`` dict to continue from. Every unusable record and failed shard is counted by reason and
    skipped; the source raises only if a whole epoch gives nothing.
    """

    def __init__(self, reader: Any, decode: Callable[[Record], Any], collator: Callable[..., dict], *,
                 local_batch_size: int, process_index: int, process_count: int, num_decode_threads: int = 0,
                 lookahead: int | None = None, state: dict | None = None):
        self.reader, self.decode, self.collator = reader, decode, collator
        self.local_batch_size = local_batch_size
        self.process_index, self.process_count = process_index, process_count
        self._lookahead = int(lookahead) if lookahead is not None else 2 * local_batch_size
        threads = int(num_decode_threads)
        self._executor = ThreadPoolExecutor(threads) if threads > 0 else None
        self._position: tuple[int, ...] = (0,) * len(reader.position_fields)
        self._batches_emitted = 0
        self.counters = SampleCounters()
        if state is not None:
            self._load_state(state)
        self._records: Iterator[Record] | None = None
        self._pending: collections.deque = collections.deque()
        # Epoch boundaries crossed since the last usable example; starting at an epoch start counts as one, so
        # a second crossing means a whole epoch gave nothing.
        self._epochs_without_example = 1 if not any(self._position[1:]) else 0

    # ----------------------------------------------------------------------------------- state
    def fingerprint(self) -> dict:
        return {**self.reader.fingerprint(), "process_index": self.process_index,
                "process_count": self.process_count, "local_batch_size": self.local_batch_size}

    def get_state(self) -> dict:
        return {"format": self.reader.state_format, **dict(zip(self.reader.position_fields, self._position)),
                "batches_emitted": self._batches_emitted, "counters": self.counters.to_dict(),
                "fingerprint": self.fingerprint()}

    def _load_state(self, state: dict) -> None:
        if state.get("format") != self.reader.state_format:
            raise ValueError(f"not a {self.reader.state_format} state: format={state.get('format')!r}")
        expected, found = self.fingerprint(), state.get("fingerprint", {})
        diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
        if diff:
            raise ValueError(f"the data state's fingerprint differs: it was saved for a different shard list "
                             f"(dataset), seed or process layout: {diff} (saved, now)")
        self._position = tuple(int(state[name]) for name in self.reader.position_fields)
        self._batches_emitted = int(state["batches_emitted"])
        self.counters = SampleCounters.from_dict(state.get("counters", {}))

    @property
    def batches_emitted(self) -> int:
        return self._batches_emitted

    # -------------------------------------------------------------------------------- reading
    def _fill(self) -> None:
        while len(self._pending) < max(1, self._lookahead):
            try:
                record = next(self._records)
            except StopIteration:
                return
            if not record.shard_end and self._executor is not None:
                self._pending.append((record, self._executor.submit(self.decode, record)))
            else:
                self._pending.append((record, None))
            if self._executor is None:
                return

    def _next_outcome(self) -> tuple[Record, Any]:
        if self._records is None:
            self._records = self.reader.records(self._position)
        if not self._pending:
            self._fill()
        if not self._pending:
            raise StopIteration
        record, future = self._pending.popleft()
        if self._executor is not None:
            self._fill()
        if record.shard_end:
            return record, None
        return record, future.result() if isinstance(future, Future) else self.decode(record)

    def _consume(self, record: Record, result: Any) -> Any:
        """Move the position past ``record`` and count it; the example it gave, or None."""
        old_epoch = self._position[0]
        self._position = record.position
        example = None
        if record.shard_end:
            self.counters.shards_finished += 1
            if record.failure is not None:
                self.counters.skip(record.failure)
        elif isinstance(result, str):  # a skip reason
            self.counters.skip(result)
        else:
            example = result
            self.counters.used += 1
            self.counters.convert(getattr(result, "conversion", ""))
        if self._position[0] != old_epoch:
            self._epochs_without_example += 1
        if example is not None:  # after the crossing: a reader may cross an epoch with a usable record
            self._epochs_without_example = 0
        if self._epochs_without_example >= 2:
            raise RuntimeError(f"a whole epoch over {self.reader.description} gave no usable sample; "
                               f"counters: {self.counters.to_dict()}")
        return example

    def __iter__(self) -> "BatchSource":
        return self

    def __next__(self) -> dict:
        examples: list = []
        while len(examples) < self.local_batch_size:
            example = self._consume(*self._next_outcome())
            if example is not None:
                examples.append(example)
        batch = self.collator(examples, step=self._batches_emitted, process_index=self.process_index)
        self._batches_emitted += 1
        batch["counters"] = self.counters.to_dict()
        return batch

    def close(self) -> None:
        """Stop the decode threads and close what the reader has open."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._records is not None:
            self._records.close()
        self._pending.clear()

    def __enter__(self) -> "BatchSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
