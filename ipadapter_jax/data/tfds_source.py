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
from typing import Any

import numpy as np

from ipadapter_jax.data.examples import BatchCollator, Example, ExampleProcessor
from ipadapter_jax.data.source import BatchSource, Record, process_share, record_rng
from ipadapter_jax.data.tar_samples import caption_text, nested_field

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


def element_image_and_caption(
    element: dict, image_key: str, caption_key: str
) -> tuple[bytes | None, str | None, str | None]:
    """(image bytes, caption, skip reason) from one numpy TFDS element.

    Keys may be nested with "/" (``"captions/text"``). A caption feature holding several captions
    (a sequence) gives its first one, so the choice is deterministic.
    """
    image = nested_field(element, image_key.split("/"))
    if image is None:
        return None, None, "missing_image"
    image_bytes = bytes(image.item() if isinstance(image, np.ndarray) and image.ndim == 0 else image)
    caption = nested_field(element, caption_key.split("/"))
    if isinstance(caption, np.ndarray) and caption.ndim > 0:
        caption = caption.reshape(-1)[0] if caption.size else None
    elif isinstance(caption, (list, tuple)):
        caption = caption[0] if caption else None
    if isinstance(caption, np.ndarray):
        caption = caption.item()
    return (image_bytes, *caption_text(caption))


class TfdsReader:
    """The records of this process's slice of a TFDS split (``tfds.split_for_jax_process``): positions
    ``(epoch, records_taken)``; each epoch reads the files in an order shuffled by (seed, epoch), records in
    file order. Starting mid-epoch rebuilds that epoch's dataset and skips the records taken (read again,
    images not decoded)."""

    state_format = STATE_FORMAT
    position_fields = ("epoch", "records_taken")

    def __init__(self, tfds: Any, name: str, split: str, data_dir: str | None, image_key: str, caption_key: str,
                 seed: int, num_epochs: int | None, read_threads: int, process_index: int, process_count: int):
        self._tfds = tfds
        self.name, self.split, self.image_key, self.caption_key = name, split, image_key, caption_key
        self.seed, self.num_epochs, self.read_threads = int(seed), num_epochs, max(1, int(read_threads))
        self._builder = tfds.builder(name, data_dir=data_dir)
        self._process_split = tfds.split_for_jax_process(split, process_index=process_index,
                                                         process_count=process_count, drop_remainder=True)
        self.description = f"TFDS split {self._process_split!r} of {name}"

    def fingerprint(self) -> dict:
        return {"name": self.name, "split": self.split, "image_key": self.image_key,
                "caption_key": self.caption_key, "seed": self.seed}

    def _epoch_elements(self, epoch: int, skip: int) -> Iterator[dict]:
        tfds = self._tfds
        epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)
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
        if skip:
            dataset = dataset.skip(skip)
        return iter(tfds.as_numpy(dataset))

    def records(self, start: tuple[int, ...]) -> Iterator[Record]:
        epoch, taken = start
        while self.num_epochs is None or epoch < self.num_epochs:
            for element in self._epoch_elements(epoch, taken):
                taken += 1
                yield Record((epoch, taken), element, f"{epoch}/{taken - 1}", (epoch, taken))
            if taken == 0:
                raise RuntimeError(f"{self.description} is empty")
            epoch, taken = epoch + 1, 0


class TfdsSource(BatchSource):
    """Local batches from a prepared TFDS dataset (``data_dir`` may be ``gs://``): a ``TfdsReader`` and the
    image decoding of `examples` composed in a ``BatchSource``.

    Args mirror `WebDatasetSource`; ``name`` / ``split`` / ``data_dir`` select the dataset,
    ``image_key`` / ``caption_key`` the features. ``read_threads``: TensorFlow's threads reading records (and
    files interleaved); ``num_decode_threads``: threads decoding and cropping images (0 = inline). Neither
    changes the order.
    """

    def __init__(self, name: str, *, global_batch_size: int, processor: ExampleProcessor, collator: BatchCollator,
                 split: str = "train", data_dir: str | None = None, image_key: str = "image",
                 caption_key: str = "caption", seed: int = 0, num_epochs: int | None = None, read_threads: int = 1,
                 num_decode_threads: int = 0, process_index: int | None = None, process_count: int | None = None,
                 state: dict | None = None):
        tfds = import_tfds()
        process_index, process_count, local = process_share(global_batch_size, process_index, process_count)
        reader = TfdsReader(tfds, name, split, data_dir, image_key, caption_key, seed, num_epochs, read_threads,
                            process_index, process_count)

        def decode(record: Record) -> Example | str:
            image_bytes, caption, reason = element_image_and_caption(record.payload, image_key, caption_key)
            return reason or processor.process_or_skip(image_bytes, caption, record.key, record_rng(seed, record))

        super().__init__(reader, decode, collator, local_batch_size=local, process_index=process_index,
                         process_count=process_count, num_decode_threads=num_decode_threads, state=state)


def _nested_decoders(path: str, decoder: Any) -> dict:
    """``{"a": {"b": decoder}}`` for ``"a/b"``: TFDS takes decoders in the features' nesting."""
    out: Any = decoder
    for part in reversed(path.split("/")):
        out = {part: out}
    return out
