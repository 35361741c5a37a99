"""``python -m ipadapter_jax.toy.write_shards --out DIR``: the toy world's coloured-shape dataset as webdataset
shards (``DIR/train-{00000..N-1}.tar`` with mixed captions, ``DIR/heldout-00000.tar`` with full captions),
deterministic in the seed. ``python3 train.py`` writes the same shards into its workdir on first use; this
command is for pointing other tools (``--config.data.shards``, ``make_shards`` users, evaluation) at them."""

from __future__ import annotations

import argparse
from typing import Sequence

from ipadapter_jax.toy.shapes_dataset import heldout_shard, write_shape_shards


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_jax.toy.write_shards",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--heldout-samples", type=int, default=64)
    args = parser.parse_args(argv)
    spec = write_shape_shards(args.out, num_shards=args.num_shards, samples_per_shard=args.samples_per_shard,
                              seed=args.seed, heldout_samples=args.heldout_samples)
    print(f"training shards: {spec}\nheld-out shard: {heldout_shard(args.out)}")
    return spec


if __name__ == "__main__":
    main()
