"""Stage 1 of edgepack: distill a teacher LLM into a smaller student.

``edgepack distill data`` (data.py) materializes the teacher (teachers.py) and stores its
filtered answers (generate.py, filters.py) in ``RUN/data``; ``edgepack distill train``
(train.py) depth-prunes the teacher into a student (student.py) and trains it with online
dense KD (losses.py, batching.py, checkpoint.py) into ``RUN/student``; ``edgepack eval``
(evaluate.py) compares teacher, undistilled and distilled student on the holdout. The
shipped demo domain (plant alarm triage) lives in ``demo/``. Heavy libraries (torch,
transformers, llama_cpp) are imported inside functions only.
"""
