"""Optional TensorFlow-Datasets source for image/caption datasets, with the same batches and
counters as `WebDatasetSource`.

``tensorflow-datasets`` (and TensorFlow) are optional: they are imported only when a `TfdsSource`
is built, with a clear ImportError if missing. Images are read as encoded bytes
(``tfds.decode.SkipDecoding``) and decoded by our own robust PIL path, so bad images are counted
and skipped the same way.

Per-process data: ``tfds.split_for_jax_process(split)`` (even, disjoint slices). Order: files are
shuffled with a per-epoch seed f(seed, epoch), records in file order. Resume: the state counts the
records taken in the current epoch; restoring rebuilds the epoch's dataset and ``skip``s them (the
records are read again, but images are not decoded).

TensorFlow only reads records here; it is kept off the accelerators and to few threads (see `import_tfds`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ipadapter_jax.data.counters import SampleCounters
from ipadapter_jax.data.examples import BatchCollator, Example, ExampleProcessor
from ipadapter_jax.data.image_ops import ImageDecodeError
from ipadapter_jax.data.shards import resolve_process

STATE_FORMAT = "ipadapter_jax.tfds_source/1"


def import_tfds(tf_threads: int = 1):
    """The ``tensorflow_datasets`` module, or an ImportError that says what to install.

    TensorFlow is imported here, never at ``ipadapter_jax`` import time. It is kept off the accelerators
    (JAX owns them: a TF that reserved GPU memory or a TPU would starve or block the training step) and its
    op thread pools are kept to ``tf_threads`` so it does not compete with XLA's CPU threads; both settings
    only take effect before TF's runtime starts, so a TF someone else already started is left as it is.
    """
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise ImportError(
            "TfdsSource needs tensorflow-datasets and tensorflow (pip install tensorflow-datasets "
            "tensorflow-cpu); they are optional and not installed. The webdataset source "
            "(ipadapter_jax.data.webdataset_source) needs neither."
        ) from exc
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # runtime already started, or no such device type in this build
            pass
    try:
        tf.config.threading.set_inter_op_parallelism_threads(tf_threads)
        tf.config.threading.set_intra_op_parallelism_threads(tf_threads)
    except RuntimeError:
        pass
    return tfds


def _lookup(element: dict, path: str) -> Any:
    value: Any = element
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def element_image_and_caption(
    element: dict, image_key: str, caption_key: str
) -> tuple[bytes | None, str | None, str | None]:
    """(image bytes, caption, skip reason) from one numpy TFDS element.

    Keys may be nested with "/" (``"captions/text"``). A caption feature holding several captions
    (a sequence) gives its first one, so the choice is deterministic.
    """
    image = _lookup(element, image_key)
    if image is None:
        return None, None, "missing_image"
    image_bytes = bytes(image.item() if isinstance(image, np.ndarray) and image.ndim == 0 else image)
    caption = _lookup(element, caption_key)
    if isinstance(caption, np.ndarray) and caption.ndim > 0:
        caption = caption.reshape(-1)[0] if caption.size else None
    elif isinstance(caption, (list, tuple)):
        caption = caption[0] if caption else None
    if isinstance(caption, np.ndarray):
        caption = caption.item()
    if caption is None:
        return image_bytes, None, "missing_caption"
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8-sig")
        except UnicodeDecodeError:
            return image_bytes, None, "bad_caption"
    if not isinstance(caption, str):
        return image_bytes, None, "bad_caption"
    caption = caption.strip()
    if not caption:
        return image_bytes, None, "missing_caption"
    return image_bytes, caption, None


class TfdsSource:
    """Iterator of local batches from a prepared TFDS dataset (``data_dir`` may be ``gs://``).

    Args mirror `WebDatasetSource`; ``name`` / ``split`` / ``data_dir`` select the dataset,
    ``image_key`` / ``caption_key`` the features. ``read_threads``: TensorFlow's threads reading records (and
    files interleaved); ``num_decode_threads``: threads decoding and cropping images (0 = inline). Neither
    changes the order.
    """

    def __init__(
        self,
        name: str,
        *,
        global_batch_size: int,
        processor: ExampleProcessor,
        collator: BatchCollator,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
        seed: int = 0,
        num_epochs: int | None = None,
        read_threads: int = 1,
        num_decode_threads: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        state: dict | None = None,
    ):
        self._tfds = import_tfds()
        self.read_threads = max(1, int(read_threads))
        self._executor = ThreadPoolExecutor(num_decode_threads) if num_decode_threads > 0 else None
        self.process_index, self.process_count = resolve_process(process_index, process_count)
        if global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by process_count {self.process_count}"
            )
        self.local_batch_size = global_batch_size // self.process_count
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.caption_key = image_key, caption_key
        self.processor, self.collator = processor, collator
        self.seed, self.num_epochs = int(seed), num_epochs
        self._builder = self._tfds.builder(name, data_dir=data_dir)
        self._process_split = self._tfds.split_for_jax_process(
            split, process_index=self.process_index, process_count=self.process_count, drop_remainder=True
        )
        self._epoch, self._taken, self._batches_emitted = 0, 0, 0
        self.counters = SampleCounters()
        if state is not None:
            self._load_state(state)
        self._elements: Iterator | None = None

    def _fingerprint(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "image_key": self.image_key,
            "caption_key": self.caption_key,
            "seed": self.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "local_batch_size": self.local_batch_size,
        }

    def get_state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "epoch": self._epoch,
            "records_taken": self._taken,
            "batches_emitted": self._batches_emitted,
            "counters": self.counters.to_dict(),
            "fingerprint": self._fingerprint(),
        }

    def _load_state(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a TFDS source state: format={state.get('format')!r}")
        if state.get("fingerprint") != self._fingerprint():
            raise ValueError(f"state fingerprint {state.get('fingerprint')} != {self._fingerprint()}")
        self._epoch, self._taken = int(state["epoch"]), int(state["records_taken"])
        self._batches_emitted = int(state["batches_emitted"])
        self.counters = SampleCounters.from_dict(state["counters"])

    def _epoch_elements(self) -> Iterator[dict]:
        tfds = self._tfds
        epoch_seed = int(np.random.SeedSequence([self.seed, self._epoch]).generate_state(1)[0] & 0x7FFFFFFF)
        import tensorflow as tf  # already imported by import_tfds

        options = tf.data.Options()
        options.deterministic = True  # the resume skip relies on the same order every time
        options.threading.private_threadpool_size = self.read_threads
        dataset = self._builder.as_dataset(
            split=self._process_split,
            shuffle_files=True,
            decoders=_nested_decoders(self.image_key, tfds.decode.SkipDecoding()),
            read_config=tfds.ReadConfig(shuffle_seed=epoch_seed, shuffle_reshuffle_each_iteration=False,
                                        interleave_cycle_length=self.read_threads, options=options),
        )
        if self._taken:
            dataset = dataset.skip(self._taken)
        return iter(tfds.as_numpy(dataset))

    def _next_element(self) -> dict:
        while True:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                raise StopIteration
            if self._elements is None:
                self._elements = self._epoch_elements()
            try:
                element = next(self._elements)
            except StopIteration:
                if self._taken == 0:
                    raise RuntimeError(f"TFDS split {self._process_split!r} of {self.name} is empty")
                self._epoch, self._taken, self._elements = self._epoch + 1, 0, None
                continue
            self._taken += 1
            return element

    def __iter__(self) -> "TfdsSource":
        return self

    def _decode(self, element: dict, epoch: int, index: int) -> Example | str:
        """Example, or the skip reason, for the ``index``-th record of ``epoch``."""
        image_bytes, caption, reason = element_image_and_caption(element, self.image_key, self.caption_key)
        if reason is not None:
            return reason
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, index + 1, 0x5EED]))
        try:
            return self.processor.process(image_bytes, caption, f"{epoch}/{index}", rng)
        except ImageDecodeError as exc:
            return exc.reason

    def __next__(self) -> dict:
        examples: list[Example] = []
        while len(examples) < self.local_batch_size:
            # Exactly as many records as still missing are read, so the state never runs ahead of the batches;
            # they are decoded in parallel, and used in read order.
            read, exhausted = [], False
            try:
                for _ in range(self.local_batch_size - len(examples)):
                    element = self._next_element()
                    read.append((element, self._epoch, self._taken - 1))
            except StopIteration:
                exhausted = True
            if self._executor is not None:
                results = list(self._executor.map(lambda r: self._decode(*r), read))
            else:
                results = [self._decode(*r) for r in read]
            for result in results:
                if isinstance(result, str):
                    self.counters.skip(result)
                    continue
                self.counters.used += 1
                self.counters.convert(result.conversion)
                examples.append(result)
            if exhausted:
                raise StopIteration
        batch = self.collator(examples, step=self._batches_emitted, process_index=self.process_index)
        self._batches_emitted += 1
        batch["counters"] = self.counters.to_dict()
        return batch

    @property
    def batches_emitted(self) -> int:
        return self._batches_emitted

    def close(self) -> None:
        """Stop the decode threads and drop the open TF iterator."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._elements = None

    def __enter__(self) -> "TfdsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _nested_decoders(path: str, decoder: Any) -> dict:
    """``{"a": {"b": decoder}}`` for ``"a/b"``: TFDS takes decoders in the features' nesting."""
    out: Any = decoder
    for part in reversed(path.split("/")):
        out = {part: out}
    return out
