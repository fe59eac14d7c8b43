"""From a prepped dataset to training batches.

`rows` (dataset rows, caption augmentation, `TrainBatch`), `latents` (the VAE latent cache),
`bucket_batches` (one aspect bucket per batch, disjoint ranks), `prefetch` (micro-batches built
ahead in a thread), `text_encoding` (captions longer than 77 tokens, the loop's text function). May import `model/` and
`train.diffusion`, never `lora/`, `generate/`, `evaluate/`, `runtime/` or the loop.
"""
