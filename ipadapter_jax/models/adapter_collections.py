"""Names of the variable collections that carry IP-Adapter weights into the frozen UNet's ``apply``.

The adapter's weights never sit in ``params``: the frozen UNet tree and the trainable adapter tree stay apart,
and only the latter is differentiated. ``models/adapter.py`` (``adapter_variables``) builds these trees;
``decoupled_cross_attention.py`` and ``lora.py`` read them.
  - ``ip_adapter``: per cross-attention, ``to_k_ip`` / ``to_v_ip`` (adapters stacked); per attention with a
    LoRA (FaceID files), ``{to_q,to_k,to_v,to_out_0}_lora_{down,up}``.
  - ``ip_scale``: per cross-attention, ``scale [num_adapters]``.
"""

ADAPTER_COLLECTION = "ip_adapter"
SCALE_COLLECTION = "ip_scale"
