"""The demo's own code (demo.py), not the core library: the captioned-shapes CLIP pretraining that stands in
for the web-scale CLIP SAN assumes. Built on the shared pieces (san_jax.train.optim, san_jax.checkpoint, the
loop's metrics and progress utilities, SAN's input normalisation, the text tower's class embeddings); the
core library never imports it."""
