"""A program for ``tpu_plan`` to compile: the jitted function, its abstract arguments and how to count its work."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax


@dataclasses.dataclass
class Program:
    """jitted / args: the function as it runs (shardings, donation) and its abstract arguments, each a
    ``ShapeDtypeStruct`` carrying its sharding.
    model_fn / model_args: the same computation without rematerialisation and with XLA attention, unsharded:
      the FLOPs an MFU is measured in (see ``plan_figures.model_flops``).
    extra_model_flops: FLOPs to add to XLA's count of ``model_fn`` (work XLA counts once but runs more often,
      such as the iterations of a loop after the first).
    tracing: a context manager active while tracing and lowering ``jitted`` (and ``repeat_jitted``): the
      device mesh (``jax.set_mesh``), which Pallas kernels need to run per device, and any patches.
    model_tracing: the same for ``model_fn`` (patches only: it is lowered unsharded, for CPU).
    repeat_jitted / repeat_args / repeat_count: a part of ``jitted`` that runs ``repeat_count`` more times
      than XLA's cost model counts (a loop body): compiled on its own, its time and FLOPs are added.
    """

    name: str
    jitted: Any
    args: tuple
    model_fn: Callable
    model_args: tuple
    images_per_step: int
    mesh_shape: dict
    description: list[str]
    tracing: Callable[[], Any] = contextlib.nullcontext
    model_tracing: Callable[[], Any] = contextlib.nullcontext
    extra_model_flops: Callable[[], float] | None = None
    repeat_jitted: Any = None
    repeat_args: tuple = ()
    repeat_count: int = 0
    lowering: Callable[[], Any] | None = None  # how the builder lowers ``jitted`` (default: under ``tracing``)

    def lower(self):
        """``jitted`` lowered on ``args``: by the program builder's own lowering where it has one (the train
        step's ``TrainProgram.lower``, the very call ``train.py`` compiles with)."""
        if self.lowering is not None:
            return self.lowering()
        with self.tracing():
            return self.jitted.lower(*self.args)

    def model_flops(self) -> float | None:
        from ipadapter_jax.tools.plan_figures import model_flops

        flops = model_flops(self.model_fn, self.model_args)
        if flops is not None and self.extra_model_flops is not None:
            flops += self.extra_model_flops()
        return flops


def with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def unsharded(abstract: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
