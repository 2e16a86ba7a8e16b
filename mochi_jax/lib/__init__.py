"""The pieces the commands compose: text encoders (text.py: T5; clip.py: CLIP tokenizer, preprocessing,
scorer), video I/O (video.py), preparing the cache (sources.py: clips, captions, buckets; placement.py:
the VAE and T5 on the devices; preparation.py: the run), the cache and its loader (cache.py, data.py),
training (training.py: loss, optimizer, step; sweep.py: one LoRA or several; trainer.py: the loop;
validation.py), sampling (sampling.py), evaluation (metrics.py, variants.py, report.py), stopping
early on a signal (stopping.py), and the programs as data (program.py: what a command runs and the
fit check compiles). They import models/, configs/ and checkpoints/, never a command."""
