"""TPU plans: what the TPU compiler expects of a config's train step or sampler on a Cloud TPU slice, compiled on
a machine without one (``python -m ipadapter_jax.plan``). ``planner`` compiles and measures the ``programs``
(the trainer's own builder and the pipeline's ``generate``) on ``reference_models``' abstract weights for a
``topology``; ``figures`` reads the estimates, ``breakdown`` splits them per op, ``table`` writes the docs' tables.
"""
