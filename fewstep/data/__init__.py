"""A user's real data: image folders, webdataset shards and saved `datasets` datasets read by index
(`images.py`), the sharded latent cache of `fewstep encode` (`cache.py`), the real latents and
prompts a run trains on (`real.py`), and the checks of the `data:` section (`spec.py`)."""
