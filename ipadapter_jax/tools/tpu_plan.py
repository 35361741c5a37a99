"""``python -m ipadapter_jax.tools.tpu_plan``: the old name of ``python -m ipadapter_jax.plan``, kept for one
release (``plan`` is ``ipadapter_jax.plan.planner.plan``)."""

from ipadapter_jax.plan.planner import plan  # noqa: F401  (the old import path)

if __name__ == "__main__":
    from ipadapter_jax.cli_errors import run_renamed

    run_renamed("python -m ipadapter_jax.tools.tpu_plan", "ipadapter_jax.plan")
