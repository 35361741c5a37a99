"""The IP-Adapter paper's evaluation (section 4.2): for every reference image, ``images_per_reference`` (4)
generations prompted by the image only (empty text, IP-Adapter scale lambda = 1); CLIP-I = mean cosine
similarity of the CLIP image embeddings of generation and reference, CLIP-T = mean CLIPScore of the
generations against the reference's caption. Several scales can be run on the same noise (the seed of a
reference does not depend on the scale), so lambda = 0 is a paired baseline.

On toy-world references (whose labels name a colour and a shape) the pixel classifier also reads every
generation: how often its colour / shape matches the reference's (chance 1/4 and 1/3 for a generator that
ignores the reference), and the counts of what it read.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Sequence

import numpy as np

from ipadapter_jax.evaluate.clip_scorer import ClipScorer
from ipadapter_jax.evaluate.references import Reference


def _toy_readings(images, reference: Reference) -> list[tuple[str | None, str | None]] | None:
    if not {"colour", "shape"} <= set(reference.labels):
        return None
    from ipadapter_jax.toy.classify import classify

    return [(r.colour, r.shape) for r in map(classify, images)]


def _score_reference(pipe, scorer: ClipScorer, ref: Reference, index: int, scale: float, images_per_reference: int,
                     prompt: str, num_inference_steps: int, guidance_scale: float, seed: int):
    """One reference's generations and their per-image scores (JSON-serialisable, so processes can share)."""
    images = pipe([prompt] * images_per_reference, ip_adapter_image=ref.image, ip_scale=scale,
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed + index)
    score, cosine = scorer.clip_score(images, ref.caption)
    record = {"clip_i": scorer.clip_i(images, ref.image).tolist(), "clip_t": score.tolist(),
              "clip_t_cosine": cosine.tolist()}
    readings = _toy_readings(images, ref)
    if readings is not None:
        record["readings"] = [[c, s] for c, s in readings]
    return record, images


def evaluate_scale(pipe, scorer: ClipScorer, references: Sequence[Reference], scale: float, *,
                   images_per_reference: int = 4, prompt: str = "", num_inference_steps: int = 50,
                   guidance_scale: float = 7.5, seed: int = 0, keep_images: bool = False,
                   log: Callable[[str], None] = print) -> dict:
    """Metrics at one IP-Adapter scale; with ``keep_images`` the result's ``"images"`` holds every
    generation (float ``[n, H, W, 3]`` per reference, not JSON-serialisable: pop it before writing).

    Under ``jax.distributed`` each process generates for every ``process_count``-th reference (reference ``i``
    keeps its seed ``seed + i``) and the per-image scores are gathered in reference order, so every process
    computes the same metrics as one process would; ``"images"`` then holds this process's references only.
    """
    import jax

    from ipadapter_jax.train.checkpoint import gather_json

    mine = range(jax.process_index(), len(references), jax.process_count())
    records, kept = {}, []
    started = time.time()
    for done, i in enumerate(mine, 1):
        records[i], images = _score_reference(pipe, scorer, references[i], i, scale, images_per_reference, prompt,
                                              num_inference_steps, guidance_scale, seed)
        if keep_images:
            kept.append(images)
        if done % max(1, len(mine) // 4) == 0:
            log(f"  scale {scale}: {done}/{len(mine)} references ({time.time() - started:.0f}s)")
    for share in gather_json({str(i): r for i, r in records.items()}):
        records.update({int(i): r for i, r in share.items()})
    ordered = [records[i] for i in range(len(references))]
    scores = {k: [x for r in ordered for x in r[k]] for k in ("clip_i", "clip_t", "clip_t_cosine")}
    result = {"scale": scale, "generations": len(scores["clip_i"]), "clip_i": float(np.mean(scores["clip_i"])),
              "clip_i_std": float(np.std(scores["clip_i"])), "clip_t": float(np.mean(scores["clip_t"])),
              "clip_t_cosine": float(np.mean(scores["clip_t_cosine"]))}
    colour_hits, shape_hits = [], []
    colours, shapes = collections.Counter(), collections.Counter()
    for ref, record in zip(references, ordered):
        for c, s in record.get("readings", []):
            colour_hits.append(c == ref.labels["colour"])
            shape_hits.append(s == ref.labels["shape"])
            colours[str(c)] += 1
            shapes[str(s)] += 1
    if colour_hits:
        result.update(colour_match=float(np.mean(colour_hits)), shape_match=float(np.mean(shape_hits)),
                      both_match=float(np.mean(np.logical_and(colour_hits, shape_hits))),
                      colour_counts=dict(sorted(colours.items())), shape_counts=dict(sorted(shapes.items())))
    if keep_images:
        result["images"] = kept
    return result


def reference_baselines(scorer: ClipScorer, references: Sequence[Reference]) -> dict:
    """CLIP-T of the references themselves (what a perfect copy would score) and the mean CLIP-I between
    different references (what an unrelated image scores)."""
    embeddings = scorer.image_embeddings([r.image for r in references])
    texts = scorer.text_embeddings([r.caption for r in references])
    cosine = np.sum(embeddings * texts, axis=-1)
    similarity = embeddings @ embeddings.T
    n = len(references)
    off_diagonal = (similarity.sum() - np.trace(similarity)) / max(n * (n - 1), 1)
    return {"reference_clip_t": float(np.mean(2.5 * np.maximum(cosine, 0.0))),
            "reference_clip_t_cosine": float(np.mean(cosine)),
            "clip_i_between_references": float(off_diagonal)}


def run_protocol(pipe, scorer: ClipScorer, references: Sequence[Reference], scales: Sequence[float] = (1.0,),
                 keep_images: bool = False, log: Callable[[str], None] = print, **kwargs) -> dict:
    """``kwargs`` go to ``evaluate_scale``. Returns ``{"results": [per scale], "baselines": {...}}``."""
    results = [evaluate_scale(pipe, scorer, references, float(s), keep_images=keep_images, log=log, **kwargs)
               for s in scales]
    report = {"results": results, "baselines": reference_baselines(scorer, references)}
    if any("colour_match" in r for r in results):
        from ipadapter_jax.toy.classify import CHANCE

        report["chance"] = {"colour_match": CHANCE["colour"], "shape_match": CHANCE["shape"],
                            "both_match": CHANCE["colour"] * CHANCE["shape"]}
    return report
