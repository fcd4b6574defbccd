"""Building blocks shared by the workflow specs (plain API-prompt fragments)."""

SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
POSITIVE = "a lighthouse on a rocky coast at dusk, dramatic clouds, detailed, sharp focus"
NEGATIVE = "blurry, low quality, watermark"


def sd15_base(width: int = 512, height: int = 512, seed: int = 42) -> dict:
    """Checkpoint, prompts, empty latent, decode and save: nodes 1-4 and 8-9; samplers go in 5-7, 10+."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": POSITIVE, "clip": ["1", 1]},
              "_meta": {"title": "Positive prompt"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]},
              "_meta": {"title": "Negative prompt"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "preprint"}},
    }


def custom_sampling(sampler: list, model: list | None = None, steps: int = 20, cfg: float = 7.0,
                    scheduler: str = "karras", seed: int = 42) -> dict:
    """SamplerCustomAdvanced with a CFGGuider, a BasicScheduler and RandomNoise; the SAMPLER comes from
    ``sampler`` (a link). Node 7 is the sampler whose output node 8 decodes."""
    model = model or ["1", 0]
    return {
        "5": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0],
                                                  "cfg": cfg}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler, "steps": steps,
                                                       "denoise": 1.0}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "7": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["5", 0],
                                                              "sampler": sampler, "sigmas": ["6", 0],
                                                              "latent_image": ["4", 0]}},
    }


def ksampler(model: list | None = None, sampler_name: str = "euler", scheduler: str = "karras", steps: int = 20,
             cfg: float = 7.0, seed: int = 42) -> dict:
    """The stock KSampler as node 7."""
    return {
        "7": {"class_type": "KSampler", "inputs": {"model": model or ["1", 0], "seed": seed, "steps": steps,
                                                 "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
                                                 "positive": ["2", 0], "negative": ["3", 0],
                                                 "latent_image": ["4", 0], "denoise": 1.0}},
    }
