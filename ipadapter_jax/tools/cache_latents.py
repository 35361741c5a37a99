"""The old name of ``python -m ipadapter_jax.cache``, kept for one release."""
if __name__ == "__main__":
    from ipadapter_jax.cli_errors import run_renamed

    run_renamed("python -m ipadapter_jax.tools.cache_latents", "ipadapter_jax.cache")
