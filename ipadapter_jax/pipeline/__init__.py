"""Sampling: ``IPAdapterPipeline`` and the compiled generation loop it runs."""

from ipadapter_jax.pipeline.ip_adapter_pipeline import IPAdapterPipeline

__all__ = ["IPAdapterPipeline"]
