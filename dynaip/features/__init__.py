"""Precomputed features: T5 / pooled CLIP text embeddings and VAE posteriors stored next to curated datasets.

``dynaip precompute`` (``cli``; ``jobs/precompute.py`` on Ray) encodes every sample once
(``encode``, ``precompute``, ``ray_exec``) into ``DATASET/features/NAME/`` (``layout``), as
checksummed safetensors shards keyed by sample key (``format``). The trainer finds a set that
serves its run and reads it per sample (``store``; ``dynaip.train.features``), so its ranks never
load T5, CLIP-L text or the VAE encoder. README "Precomputed features" has the storage cost.
"""
