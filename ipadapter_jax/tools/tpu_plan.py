"""The old name of ``python -m ipadapter_jax.plan`` (and of ``plan.planner.plan``), kept for one release."""
from ipadapter_jax.plan.planner import plan  # noqa: F401

if __name__ == "__main__":
    from ipadapter_jax.cli_errors import run_renamed

    run_renamed("python -m ipadapter_jax.tools.tpu_plan", "ipadapter_jax.plan")
