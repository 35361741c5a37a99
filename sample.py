"""Sample images with an IP-Adapter. See ``python sample.py --help``; the logic is in ipadapter_jax.sample."""

from ipadapter_jax.sample import cli

if __name__ == "__main__":
    cli()
