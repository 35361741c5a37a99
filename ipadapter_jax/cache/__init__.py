"""The latent cache (``data.cache_latents``): the frozen encoders run once ahead of training, and the train
step reads their outputs instead of pixels and token ids.

    python -m ipadapter_jax.cache --config configs/sd15.py --out DIR    # write a cache (__main__)

``format`` is the on-disk layout and the per-example members; ``encode`` the encoders' work; ``write`` the
writer; ``manifest`` what a cache must agree on with a config, and opening one; ``source`` the training source
over its shards; ``batch`` the train step's side (the cached batch and ``frozen["image_uncond"]``).
"""
