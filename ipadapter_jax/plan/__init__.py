"""TPU plans: compile a config's train step (or sampler) for a Cloud TPU slice on a machine without one, and
report what the compiler expects (per-chip HBM, FLOPs, step time, images/s, MFU).

    python -m ipadapter_jax.plan --config configs/sd15.py --topology v5e-8    # the command line (__main__)

``planner.plan`` compiles and measures; ``programs`` holds what it compiles (the trainer's own
``train.program.build_train_program`` and the pipeline's ``generate``); ``reference_models`` the abstract
frozen models built from configs; ``topology`` the slice names and chip figures; ``figures`` the estimates
read from a compiled program; ``breakdown`` a per-op roofline of its HLO; ``table`` the docs' plan tables.
"""
