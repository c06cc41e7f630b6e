"""Everything that runs a compressed KV cache: one policy implementation serving decoding and training.

* `compressor`: one compression event of one layer (score -> protect -> select -> merge -> archive);
* `codecs`, `storage`: how kept tokens are held (low-rank coefficients, TaDA-packed codes, recent tokens);
* `schedule`: when events happen (after each prefill chunk, every `interval` decode steps);
* `routing`: the registered ``kvtrain`` attention function and how a call reaches a cache layer, a replay or an
  observer; `attention`: the attention arithmetic they share;
* `cache`: `CompressedCache`, a transformers `Cache` (what `model.generate` uses);
* `replay`: `replay_compression`, the same keep-sets in one teacher-forced forward (what training uses);
* `decode`: `teacher_forced_decode`, the step-by-step reference that replay must equal;
* `sals/`: SALS, a cache mode of its own (latent keys, per-step top-k), its layer, runtime and replay.
"""
