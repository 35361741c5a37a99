"""Checkpoints (orbax ``CheckpointManager``, named items, async, keep the last K) and adapter export.

Items of ``WORKDIR/checkpoints/<step>/``:
  adapter    the adapter params (float32, sharded arrays)
  opt_state  the optimizer state
  step       ``{"step": N}``
  data       ``{"process_count": P, "states": [state of process 0, ...]}``: each process's data-iterator
             position (JSON), so every host resumes its own shards exactly
  rng        the base PRNG key's data (uint32)
  config     the training config as JSON
Only what trains is saved; the frozen models are re-read from ``model_dir``. A checkpoint restores on any
mesh: the abstract state passed to ``restore`` carries the new shardings and orbax re-lays the arrays out.

The adapter is also exported in the published (h94) layout at every save: ``WORKDIR/ip_adapter.safetensors``
(the latest, replaced atomically) and ``WORKDIR/adapters/ip_adapter_<step>.safetensors`` (the last K).

``WORKDIR`` is a local folder or a URL (``gs://BUCKET/runs/x``). Checkpoints are orbax's own remote paths
(on GCS orbax commits a step by writing ``commit_success.txt`` last, with no renames); the exports and the
moves of damaged checkpoints go through ``WorkdirFiles``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ipadapter_jax.models.adapter import IPAdapter
from ipadapter_jax.models.image_projection import ProjectionConfig
from ipadapter_jax.train.config import CheckpointConfig
from ipadapter_jax.train.state import TrainState
from ipadapter_jax.train.workdir_files import WorkdirFiles
from ipadapter_jax.weights.ip_adapter_file import ip_adapter_file_bytes

logger = logging.getLogger(__name__)

ITEMS = ("adapter", "opt_state", "step", "data", "rng", "config")
TRASH = ".deleted"  # inside checkpoints/: pruned checkpoints on their way out
DAMAGED = "checkpoints.damaged"  # beside checkpoints/: checkpoints that did not restore, moved aside, kept
EXPORT_NAME = "ip_adapter.safetensors"


def gather_json(value: Any) -> list:
    """Every process's JSON-serialisable ``value``, in process order (one collective; single-process: [value])."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(gathered, lengths)]


def host_copy(tree: Any) -> Any:
    """Numpy copy of a tree of (possibly multi-host sharded) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


class CheckpointSaveError(RuntimeError):
    """A checkpoint (or the adapter export) could not be written: the message names the step, the folder,
    the cause and the last complete checkpoint, which a rerun resumes from."""


class CheckpointMismatchError(ValueError):
    """A checkpoint is intact but holds a state of other shapes than the config builds (the adapter or
    optimizer config changed): nothing is moved; resume with the old config or train in another workdir."""


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of the workdir restores; the message names them and where they were moved."""


def _one_line(exc: BaseException, limit: int = 200) -> str:
    # tensorstore appends the whole spec of the array it failed on: the first sentence is the message.
    text = " ".join(str(exc).split("See full TensorStore details")[0].split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _is_closed_loop_callback(exc_type, exc) -> bool:
    # tensorstore finishes an abandoned read on its own thread and hands the result to the asyncio loop orbax
    # ran the restore in; that loop is closed by then, and the callback's RuntimeError is printed directly
    # (sys.excepthook), with no "Exception ignored" header.
    return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _quiet_abandoned_reads() -> None:
    """After a failed restore, orbax leaves the reads of the other arrays behind: as coroutines whose
    exceptions nobody retrieves (printed through ``sys.unraisablehook`` when collected, often at exit), and as
    tensorstore callbacks into the restore's closed event loop (printed through ``sys.excepthook`` from
    tensorstore's threads, at any time). Both are the damage the one warning line already reported: drop
    exactly those, pass everything else on."""
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
    if getattr(previous_unraisable, "_drops_abandoned_orbax_reads", False):
        return

    def unraisable_hook(unraisable):
        where = getattr(unraisable.object, "__qualname__", "") or repr(unraisable.object)
        if ("_read_array_index_and_device_put" in where or "orbax" in where
                or _is_closed_loop_callback(unraisable.exc_type, unraisable.exc_value)):
            return
        previous_unraisable(unraisable)

    def except_hook(exc_type, exc, tb):
        if _is_closed_loop_callback(exc_type, exc):
            return
        previous_except(exc_type, exc, tb)

    unraisable_hook._drops_abandoned_orbax_reads = True
    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


def _is_mismatch(exc: BaseException) -> bool:
    # orbax's wording for a request that does not fit intact data (see restore_newest_intact).
    text = str(exc)
    return isinstance(exc, ValueError) and ("is not compatible with the stored shape" in text
                                            or "tree structures do not match" in text)


class Checkpointer:
    """Saves and restores the training state of one workdir (see module docstring).

    A failed save (full disk, unwritable folder, ...) raises `CheckpointSaveError`: at ``save`` when it fails
    at once, else, for the background part of an async save, at the next ``check_for_errors`` (the loop calls
    it every step), ``save``, ``wait_until_finished`` or ``close``.
    """

    def __init__(self, workdir: str | Path | WorkdirFiles, config: CheckpointConfig):
        self.files = workdir if isinstance(workdir, WorkdirFiles) else WorkdirFiles(workdir)  # absolute: orbax
        self.workdir = self.files.path
        self.directory = self.files.epath("checkpoints")
        self.config = config
        self._saving: int | None = None  # the step of the last save started (its background part may still run)
        # The step folder is created in save() itself: created in the background, a failure (unwritable or full
        # disk) left orbax's writer threads waiting for it until their 5-minute timeout, so the process hung
        # that long before exiting with the error.
        # Checkpoints beyond `keep` are renamed into TRASH (one atomic step) and deleted from there: deleted in
        # place, a kill part-way left a step folder that is listed but does not restore. Temporary folders of
        # saves a kill interrupted are removed when the manager starts.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, create=True, enable_async_checkpointing=config.async_save,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            todelete_subdir=TRASH, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        # orbax removes those folders in the background and waits for it only in its next save: until then a
        # half-written step from a killed run is still listed beside the restored one (on GCS, where a step
        # without commit_success.txt is the temporary, this is what a reader of the bucket sees).
        getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self._empty_trash()

    def _empty_trash(self) -> None:
        # orbax ignores todelete_subdir on GCS (it deletes there directly), so the trash is a local folder.
        if jax.process_index() == 0 and self.files.is_local:
            shutil.rmtree(self.directory / TRASH, ignore_errors=True)

    def committed_steps(self) -> list[int]:
        """Steps whose checkpoint is complete on storage (read from storage, not the manager's cache)."""
        try:
            return sorted(ocp.path.step.checkpoint_steps(self.directory))
        except Exception:  # e.g. the folder itself is unreadable: nothing can be promised
            return []

    def failure(self, what: str, step: int | None, exc: BaseException, where: Path | str | None = None
                ) -> CheckpointSaveError:
        """The error to raise when writing ``what`` (into ``where``, default the checkpoint folder) at ``step``
        failed with ``exc``."""
        committed = self.committed_steps()
        last = f"step {committed[-1]}" if committed else "none"
        at = f" at step {step}" if step is not None else ""
        return CheckpointSaveError(
            f"could not save {what}{at} in {where or self.directory}: {type(exc).__name__}: {exc}. The last complete "
            f"checkpoint is {last}; the run stops here (free disk space or fix permissions, then rerun to "
            f"resume from it)")

    def _guard(self, call, what: str = "the checkpoint"):
        try:
            return call()
        except CheckpointSaveError:
            raise
        except Exception as exc:
            raise self.failure(what, self._saving, exc) from exc

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, rng: jax.Array, data_state: dict, config_dict: dict) -> int:
        """Starts an (async) save of ``state`` at its own step; every process must call this. Returns the step."""
        step = int(jax.device_get(state.step))
        data_states = gather_json(data_state)
        args = ocp.args.Composite(
            adapter=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            step=ocp.args.JsonSave({"step": step}),
            data=ocp.args.JsonSave({"process_count": len(data_states), "states": data_states}),
            rng=ocp.args.StandardSave({"key_data": jax.random.key_data(rng)}),
            config=ocp.args.JsonSave(config_dict),
        )
        self._guard(self.manager.wait_until_finished)  # a failure of the previous save is reported as its own
        self._empty_trash()  # what the previous save pruned
        self._saving = step
        self._guard(lambda: self.manager.save(step, args=args, force=True))
        return step

    def check_for_errors(self) -> None:
        """Raise `CheckpointSaveError` if the background part of the last save failed (cheap; call often)."""
        self._guard(self.manager.check_for_errors)

    def restore(self, abstract_state: TrainState, abstract_rng_data: jax.ShapeDtypeStruct,
                step: int | None = None) -> tuple[TrainState, jax.Array, dict, dict]:
        """``(state, rng_data, data, config_dict)`` of ``step`` (default: the latest), laid out as
        ``abstract_state`` (ShapeDtypeStructs with shardings) says. ``rng_data`` is the base PRNG key's raw
        data (``sharding.replicated_key`` makes it a key); ``data`` is the saved ``data`` item."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            adapter=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            step=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore(),
            rng=ocp.args.StandardRestore({"key_data": abstract_rng_data}),
            config=ocp.args.JsonRestore(),
        ))
        saved_step = int(restored["step"]["step"])
        step_array = jax.device_put(np.asarray(saved_step, np.int32), abstract_state.step.sharding)
        state = TrainState(step=step_array, params=restored["adapter"], opt_state=restored["opt_state"])
        return state, restored["rng"]["key_data"], restored["data"], restored["config"]

    def restore_newest_intact(self, abstract_state: TrainState, abstract_rng_data: jax.ShapeDtypeStruct
                              ) -> tuple[TrainState, jax.Array, dict, dict, int]:
        """``restore`` of the newest checkpoint that restores, and its step. A checkpoint that fails to read
        (truncated or missing files, a deleted item, garbage metadata, arrays of other dtypes than saved) is
        reported in one warning line, moved aside into ``WORKDIR/checkpoints.damaged/`` (never deleted or
        overwritten) and the previous one is tried. Raises ``CheckpointMismatchError`` when an intact
        checkpoint does not fit ``abstract_state`` (a changed config: nothing is moved) and
        ``CheckpointRestoreError`` when none restores."""
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                # From the stored metadata first: a state of other shapes is a changed config, and finding
                # that before reading any array leaves no half-finished reads behind.
                if not self._stored_shapes_fit(step, abstract_state):
                    raise CheckpointMismatchError(
                        f"the checkpoint at step {step} in {self.directory} holds an adapter / optimizer state "
                        f"of other shapes than this config builds; resume with the config it was trained with "
                        f"(its config item), or train in another workdir")
                restored = self.restore(abstract_state, abstract_rng_data, step)
            except CheckpointMismatchError:
                raise
            except Exception as exc:
                if _is_mismatch(exc):
                    raise CheckpointMismatchError(
                        f"the checkpoint at step {step} in {self.directory} does not fit this config's adapter "
                        f"state ({_one_line(exc, 160)}); resume with the config it was trained with, or train in "
                        f"another workdir") from exc
                _quiet_abandoned_reads()
                where = self._move_aside(step)
                damaged.append(step)
                logger.warning("checkpoint step %d is damaged and does not restore (%s); moved it to %s and "
                               "trying the previous one", step, _one_line(exc), where)
                continue
            return (*restored, step)
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} restores: step(s) {', '.join(map(str, damaged))} are damaged and "
            f"were moved to {self.files / DAMAGED}; train in a new workdir, or restore a copy of the checkpoints")

    def _stored_shapes_fit(self, step: int, abstract_state: TrainState) -> bool:
        """Whether the stored adapter and optimizer arrays have the expected shapes. Raises (the checkpoint is
        damaged) when the metadata does not read, or when the shapes fit but the dtypes do not: orbax would
        cast such arrays to the requested dtype silently, and this trainer never writes them so."""
        handler = ocp.StandardCheckpointHandler()
        fits = True
        for item, expected in (("adapter", abstract_state.params), ("opt_state", abstract_state.opt_state)):
            stored = jax.tree.leaves(handler.metadata(self.directory / str(step) / item).tree)
            shapes = lambda leaves: sorted(tuple(x.shape) for x in leaves)  # noqa: E731
            if shapes(stored) != shapes(jax.tree.leaves(expected)):
                fits = False
                continue
            layout = lambda leaves: sorted((tuple(x.shape), str(x.dtype)) for x in leaves)  # noqa: E731
            if layout(stored) != layout(jax.tree.leaves(expected)):
                raise ValueError(f"{item}: arrays stored in other dtypes than this trainer writes")
        return fits

    def _move_aside(self, step: int) -> str:
        """Move a damaged checkpoint out of orbax's sight into ``checkpoints.damaged/<step>[.<n>]`` (on an object
        store a copy, then the original deleted: a kill between leaves both, and the next run moves it again)."""
        taken = set(self.files.listdir(DAMAGED))
        name, n = str(step), 0
        while name in taken:
            n += 1
            name = f"{step}.{n}"
        if jax.process_index() == 0:
            self.files.move_tree(f"checkpoints/{step}", f"{DAMAGED}/{name}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_{step}_moved_aside")
        self.manager.reload()
        return self.files / f"{DAMAGED}/{name}"

    def read_json(self, step: int, item: str) -> dict:
        """One JSON item (``step``, ``data`` or ``config``) of a checkpoint, without restoring arrays."""
        return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def wait_until_finished(self) -> None:
        self._guard(self.manager.wait_until_finished)

    def close(self, raise_errors: bool = True) -> None:
        """Finish pending saves and release the manager. ``raise_errors=False`` (closing because of another
        error) logs a failed save instead of raising it over that error."""
        try:
            self._guard(self.manager.wait_until_finished)
            self.manager.close()
        except Exception as exc:
            if raise_errors:
                raise
            logger.error("%s", exc)


def saved_config(workdir: str | Path) -> dict | None:
    """The training config saved with the newest complete checkpoint in ``WORKDIR/checkpoints``, read from
    storage without opening a manager (nothing is created or pruned, so a read-only workdir is fine); None when
    there is no checkpoint or its config item cannot be read."""
    directory = WorkdirFiles(workdir).epath("checkpoints")
    if not directory.is_dir():
        return None
    try:
        steps = sorted(ocp.path.step.checkpoint_steps(directory))
    except Exception:  # an unreadable folder: nothing to say
        return None
    for step in reversed(steps):
        try:  # orbax's JsonSave keeps an item's JSON in <item>/metadata
            value = json.loads((directory / str(step) / "config" / "metadata").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            return value
    return None


def data_state_for_process(saved: dict, process_index: int, process_count: int) -> dict:
    """This process's data-iterator state from a checkpoint's ``data`` item; the process layout must match
    (each host owns its shards, so positions cannot be re-split over a different number of hosts)."""
    if saved.get("process_count") != process_count:
        raise ValueError(f"the checkpoint was written by {saved.get('process_count')} processes, this run has "
                         f"{process_count}: the data position cannot be carried over; restart the data or use "
                         f"the same number of hosts")
    return saved["states"][process_index]


def export_adapter(params: Any, projection: ProjectionConfig, workdir: str | Path | WorkdirFiles, step: int,
                   keep: int, dtype: str = "float32") -> Path | str | None:
    """Write the adapter in the published layout (see module docstring); process 0 writes, every process
    must call this (the params may be sharded across hosts). Returns the latest file's path (or URL) on
    process 0. Each file is written whole or not at all (``WorkdirFiles.write_atomic``): a reader of
    ``ip_adapter.safetensors`` sees the previous export or this one."""
    host = host_copy(params)
    if jax.process_index() != 0:
        return None
    files = workdir if isinstance(workdir, WorkdirFiles) else WorkdirFiles(workdir)
    data = ip_adapter_file_bytes(IPAdapter(projection, host),
                                 dtype=np.dtype(dtype) if dtype != "bfloat16" else jax.numpy.bfloat16)
    files.write_atomic(f"adapters/ip_adapter_{step:08d}.safetensors", data)
    files.write_atomic(EXPORT_NAME, data)
    exports = sorted(n for n in files.listdir("adapters") if n.startswith("ip_adapter_") and n.endswith(".safetensors"))
    for old in exports[:-keep]:
        files.remove(f"adapters/{old}")
    latest = files / EXPORT_NAME
    return Path(latest) if files.is_local else latest
