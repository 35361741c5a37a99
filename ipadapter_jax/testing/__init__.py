"""Random-weights models for tests and benchmarks (never used by the library itself): ``tiny_models`` is the
one spec of the tiny (and benchmark-sized) models, ``random_model`` writes them as diffusers folders,
``reference_pipelines`` the parity references built on them, ``random_weights`` torch-side random weights and
published-layout adapter files. The trained toy world lives in ``ipadapter_jax/toy``."""
