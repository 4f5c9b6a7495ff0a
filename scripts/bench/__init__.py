"""scripts/bench.py's parts, one idea per module: ``timing`` (interleaved repeats and their
summary), ``machine`` (the machine and its memory bandwidth), ``exports`` (the artefacts
measured), ``latency`` (vision and time to first token), ``decode`` (decode steps through the
pipeline's seams), ``agreement`` (teacher-forced top-1 agreement), ``memory`` (peak RSS of
fresh processes), ``profiles`` (per-op profiles), ``report`` (ratios, targets, markdown) and
``runs`` (the whole run in order)."""
