"""Images → cached stage outputs (latents, features, PCA) → training shards."""
