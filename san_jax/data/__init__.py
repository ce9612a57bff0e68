"""Data: TFDS builders per data set, class vocabularies, the synthetic shapes set, host-side augmentation
and the resumable, per-host input pipeline. Knows nothing of models (DESIGN §2); see README.md here."""
