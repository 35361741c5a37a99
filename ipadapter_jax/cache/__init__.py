"""The latent cache (``data.cache_latents``): the frozen encoders run once ahead of training (``python -m
ipadapter_jax.cache``) and the train step reads their outputs. ``format``: the files and members; ``encode``: the
encoders' work; ``write``: the writer; ``manifest``: what a cache must agree on with a config, and opening it;
``source``: the training source over its shards; ``batch``: the train step's side (``frozen["image_uncond"]``).
"""
