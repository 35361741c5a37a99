"""Evaluation with the IP-Adapter paper's protocol (CLIP-I / CLIP-T): ``python -m ipadapter_jax.evaluate``.

* ``clip_scorer.ClipScorer``: image / text embeddings of any transformers ``CLIPModel`` folder.
* ``references``: reference images with captions (toy held-out set, webdataset shards, COCO-2017 val).
* ``protocol.run_protocol``: generations per reference at one or more IP-Adapter scales, and the metrics.
* ``cli.main``: the command line, writing a JSON report.
"""
