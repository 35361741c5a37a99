"""IP-Adapter for Stable Diffusion 1.5 (the paper's setup: plain adapter, 4 image tokens, CLIP ViT-H/14 image
encoder, 512px, AdamW lr 1e-4, weight decay 0.01, 5% text / image / both dropout).

Usage: python train.py --config configs/sd15.py --workdir gs://BUCKET/runs/sd15 \
    --config.model.model_dir=/models/stable-diffusion-v1-5 \
    --config.model.image_encoder_dir=/models/IP-Adapter/models/image_encoder \
    --config.data.shards='gs://BUCKET/shards/{00000..01023}.tar' --config.batch_size=256

The workdir is a local folder or a gs:// URL written to directly (no FUSE mount); shards, model and image
encoder folders may be gs:// URLs too.

This is the base config, with every field and what it means: ``sd15_plus.py``, ``sdxl.py`` and ``tiny.py``
call ``get_config()`` and override only what differs, and the defaults of ``ipadapter_jax.train.config``
equal it (tests/test_train_config.py). Where it departs from the paper or tencent's training script, the
comment says so ("not in the paper").
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds the adapter init, noise, timesteps, shard order, conditioning dropout and any toy shards
    c.num_steps = 1_000_000  # optimizer updates in all
    c.batch_size = 64  # global batch over all devices and hosts (the paper: 8 GPUs x 8)

    c.model = ml_collections.ConfigDict()
    c.model.model_dir = "models/stable-diffusion-v1-5"  # diffusers-layout base model folder (unet/ vae/ text_encoder/ ...)
    c.model.image_encoder_dir = "models/IP-Adapter/models/image_encoder"  # CLIPVisionModelWithProjection (ViT-H/14)
    c.model.compute_dtype = "bfloat16"  # dtype of the frozen weights and activations (the adapter trains in float32)
    c.model.attention_implementation = "auto"  # "auto": Pallas flash attention on TPU, XLA elsewhere; or "xla", "pallas"
    c.model.remat = False  # recompute UNet blocks in the backward pass (less memory, more compute)
    c.model.sample_posterior = True  # VAE latents as a posterior sample (the reference script) rather than the mean

    c.adapter = ml_collections.ConfigDict()
    # A new adapter: to_k_ip / to_v_ip copy each to_k / to_v (the paper); the projection net starts from flax's
    # initialisers (lecun-normal kernels), not torch's nn.Linear default that tencent's script gets.
    c.adapter.variant = "plain"  # "plain" (image_embeds -> 4 tokens) or "plus" (Resampler over hidden states)
    c.adapter.num_tokens = 4  # image tokens the projection produces
    c.adapter.init_from = ""  # an ip_adapter .safetensors/.bin to fine-tune; "" starts from the paper init
    c.adapter.hidden_dim = 768  # Plus only: the Resampler's width
    c.adapter.depth = 4  # Plus only: Resampler layers (diffusers loads depth 4 only)
    c.adapter.heads = 12  # Plus only: attention heads of the Resampler
    c.adapter.dim_head = 64  # Plus only: head width (diffusers loads 64 only)
    c.adapter.ff_mult = 4  # Plus only: feed-forward expansion

    c.data = ml_collections.ConfigDict()
    c.data.shards = "data/shards/{00000..00999}.tar"  # webdataset shard spec (paths, globs, {a..b} braces, gs://, pipe:)
    c.data.caption_field = ""  # "" reads the caption from .txt; else this (dotted) field of the .json member
    c.data.resolution = 512  # image side, multiple of 8: shortest side resized (bicubic; tencent's: bilinear), centre crop
    c.data.random_crop = False  # random instead of centre crop
    c.data.drop_text = 0.05  # probability of dropping only the caption (classifier-free guidance)
    c.data.drop_image = 0.05  # probability of dropping only the image
    c.data.drop_both = 0.05  # probability of dropping both
    c.data.shuffle_shards = True  # new shard order every epoch (deterministic in the seed)
    c.data.decode_threads = 16  # image-decoding threads per process
    c.data.prefetch_batches = 2  # batches read ahead of the step
    c.data.cache_latents = False  # read VAE moments + text/image encodings from cache_dir (no encoders in the step)
    c.data.cache_dir = ""  # folder written by python -m ipadapter_jax.cache (any URL shards can use)
    c.data.tfds_name = ""  # prepared TFDS dataset (e.g. "coco_captions") to train from, with data.shards=""; "" = shards
    c.data.tfds_split = "train"  # TFDS split (slicing allowed: "train[:90%]"); each process reads an even, disjoint part
    c.data.tfds_data_dir = ""  # TFDS data_dir holding the prepared dataset (gs:// works); "" = TFDS's default
    c.data.tfds_image_key = "image"  # feature holding the encoded image ("a/b" for nested features)
    c.data.tfds_caption_key = "caption"  # text feature holding the caption (first one if several)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4  # peak learning rate (the paper's)
    c.optimizer.weight_decay = 0.01  # AdamW decoupled weight decay
    c.optimizer.b1 = 0.9  # Adam first-moment decay
    c.optimizer.b2 = 0.999  # Adam second-moment decay
    c.optimizer.eps = 1e-8  # Adam epsilon
    c.optimizer.schedule = "constant"  # after warmup: "constant", "cosine" or "linear" decay
    c.optimizer.warmup_steps = 1000  # linear warmup from 0 (not in the paper: its 1e-4 holds from step 0; 0 for that)
    c.optimizer.final_lr_fraction = 0.0  # cosine/linear decay ends at this fraction of the peak
    c.optimizer.grad_clip_norm = 1.0  # global-norm gradient clipping (not in the paper); 0 turns it off
    c.optimizer.max_nonfinite_steps = 10  # stop after this many NaN/Inf steps in a row (each update skipped); 0 = never
    c.optimizer.grad_accum_steps = 1  # micro-batches per update (batch_size must divide by it)

    c.loss = ml_collections.ConfigDict()
    c.loss.noise_offset = 0.0  # adds noise_offset * N(0, 1) per example and channel to the noise; 0 = off
    c.loss.min_snr_gamma = 0.0  # min-SNR loss weighting gamma (5.0 is typical); 0 = plain MSE

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel size; -1 = all devices left after fsdp
    c.mesh.fsdp = 1  # devices each large weight is split over (batch is split over data x fsdp)
    c.mesh.fsdp_min_size = 1 << 20  # weights with fewer elements are replicated
    c.mesh.logical_axis_rules = (("batch", ("data", "fsdp")), ("fsdp", "fsdp"))  # logical -> mesh axes

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 5000  # checkpoint + adapter export interval
    c.checkpoint.keep = 3  # checkpoints (and per-step adapter exports) kept
    c.checkpoint.async_save = True  # write checkpoints in the background
    c.checkpoint.export_dtype = "float16"  # dtype of the exported ip_adapter.safetensors ("float16" as published)

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 50  # metrics.jsonl / TensorBoard interval
    c.log.progress_bar = True  # tqdm bar with loss, steps/s, images/s
    c.log.tensorboard = True  # write TensorBoard events to WORKDIR/tensorboard

    c.validation = ml_collections.ConfigDict()
    c.validation.every_steps = 5000  # sample a validation grid this often; 0 = never
    c.validation.num_images = 4  # image prompts taken from the first shard when `images` is empty
    c.validation.images = ()  # image files to use as prompts instead
    c.validation.prompt = ""  # text prompt used with every image prompt
    c.validation.scales = (0.0, 0.5, 1.0)  # IP-Adapter scales, one grid column each
    c.validation.sampler = "ddim"  # "ddim", "euler" or "dpm++2m"
    c.validation.num_inference_steps = 30  # sampler steps
    c.validation.guidance_scale = 7.5  # classifier-free guidance (uncond: empty text, dropped image)
    c.validation.seed = 0  # seed of the validation noise (fixed, so grids compare across steps)
    return c
