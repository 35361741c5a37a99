"""The built-in toy world: coloured-shapes data, a mini CLIP, a tiny VAE and a tiny text-conditioned UNet,
small enough to rebuild on a laptop CPU (``python -m ipadapter_jax.toy.build --out DIR``) and shipped in
``ipadapter_jax/assets/toy`` so that the default training run learns something visible."""
