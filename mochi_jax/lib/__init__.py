"""The pieces the commands compose: text encoders (text.py: T5; clip.py: CLIP tokenizer, preprocessing,
scorer), video I/O (video.py), the cache and its loader (cache.py, data.py, preparation.py), training
(training.py: loss, optimizer, step; trainer.py: the loop; validation.py), sampling (sampling.py),
evaluation (metrics.py, variants.py, report.py). They import models/ and checkpoints/, never a command."""
