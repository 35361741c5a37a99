"""Sample images with an IP-Adapter. See ``python sample.py --help``; the logic is in ipadapter_jax.sample."""

from ipadapter_jax.sample import main

if __name__ == "__main__":
    main()
