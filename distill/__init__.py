"""Stage 1 of edgepack: distill a teacher LLM into a smaller student.

``edgepack distill data`` (data.py) materializes the teacher (teachers.py; LoRA-corrected first
with ``--correct-teacher``, correct.py) and stores its filtered answers (generate.py; endpoint.py
for an endpoint teacher; answer_cache.py, filters.py, contamination.py) in ``RUN/data``. The
domains shipped with edgepack live in ``demo/`` and ``domains/``.

``edgepack distill train`` is one recipe, top to bottom (train.py): setup (train_setup.py: the
student, depth-pruned from the teacher by student.py and width.py, or a user's folder; what it
learns from, modes.py; its memory plan, plan.py) → step (train_step.py; the mode's loss from
train_loss.py, over losses.py, batching.py, softlabels.py and endpoint_targets.py; parallel.py
for torchrun ranks) → checkpoint and save (train_save.py, checkpoint.py, curves.py) into
``RUN/student``. ``edgepack eval`` (evaluate.py) compares teacher, undistilled and distilled
student on the holdout.

Heavy libraries stay out of ``edgepack --help``: batching.py, losses.py, endpoint_targets.py and
the recipe modules (train_setup.py, train_step.py, train_loss.py, train_save.py) import torch at
the top, and are themselves imported only inside functions (train.py, correct.py, evaluate.py,
softlabels.py); every other module imports torch, transformers and llama_cpp inside the
functions that use them.
"""
