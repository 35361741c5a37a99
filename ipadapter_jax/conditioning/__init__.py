"""The UNet's conditioning, computed once for the trainer (train step, latent cache, validation grids) and the
pipeline: token ids, text encodings for SD and SDXL, SDXL's time ids, CLIP preprocessing of image prompts,
image-prompt features, FaceID's face embeddings, and the negatives classifier-free guidance and dropout use.

``text``: tokenise and encode prompts, time ids, negative prompts. ``image_prompt``: the CLIP preprocessing a
base model asks for, and the image encoder's features for the adapter's projection net, with dropped images.
``face``: face embeddings (arrays or ``.npy`` files) for the FaceID adapters, with their zero negative.
Whether a base is SDXL is asked of its UNet config alone (``UNetConfig.is_sdxl``).
"""

from ipadapter_jax.conditioning.face import face_prompt_features, load_face_embeds, read_face_embeds
from ipadapter_jax.conditioning.image_prompt import (clip_processing_config, encode_image_prompt,
                                                     image_prompt_features)
from ipadapter_jax.conditioning.text import (INPUT_IDS, TEXT_ENCODERS, TOKENIZERS, TextConditioning,
                                             added_conditioning, encode_text, prompt_conditioning, sdxl_time_ids,
                                             text_encoder_names)

__all__ = ["INPUT_IDS", "TEXT_ENCODERS", "TOKENIZERS", "TextConditioning", "added_conditioning",
           "clip_processing_config", "encode_image_prompt", "encode_text", "face_prompt_features",
           "image_prompt_features", "load_face_embeds", "prompt_conditioning", "read_face_embeds", "sdxl_time_ids",
           "text_encoder_names"]
