"""The diffusion runtime in numpy: what runs an SD/SDXL artifact on a device without torch.

noise.py        torch's CPU generator reproduced (same seed, same initial noise as diffusers)
schedulers/     diffusers' schedulers in numpy, read from the artifact's scheduler_config.json
tokenizer.py    CLIP tokenization with the `tokenizers` library from the artifact's files
(the denoising loop over our Sessions: modelkiln/pipelines/diffusion.py)

Nothing here imports torch, diffusers or transformers (tests/test_torch_free.py).
"""
