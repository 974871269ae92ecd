"""Names shared between stages: run-directory layout, run.toml keys, manifest keys.

Stages talk through files in the run directory; every file name and key lives here so a
rename is one edit.
"""

from __future__ import annotations

BUILTIN_TEACHER = "builtin:smollm2-135m-instruct"
TRAINING_DEVICES = ("auto", "cpu", "cuda", "mps")  # distill train / pipeline --device
TEACHER_API_KEY_ENV = "EDGEPACK_TEACHER_API_KEY"  # default variable holding an endpoint teacher's key

# --- run directory layout (each entry written by exactly one stage) -------------------
RUN_TOML = "run.toml"              # pipeline / first stage: what was asked for
DATA_DIR = "data"                  # distill data: train.jsonl, holdout.jsonl, report.json
TEACHER_DIR = "teacher"            # distill data: the teacher materialised as an HF dir
TEACHER_CORRECTED_DIR = "teacher-corrected"  # distill data --correct-teacher: LoRA-SFT'd teacher (HF + GGUF)
TEACHER_CACHE_DIR = "cache/teacher"  # distill data: one JSON per teacher answer (resume)
STUDENT_DIR = "student"            # distill train: the distilled student (HF, safetensors)
CHECKPOINT_DIR = "checkpoints"     # distill train: resumable checkpoints
SOFTLABELS_DIR = "softlabels"      # distill train --soft-labels: sparse teacher targets (shards + index.json)
ARTIFACTS_DIR = "artifacts"        # export: .gguf / onnx folders + export.json
GATE_DIR = "gate"                  # gate: <artifact>.json reports
BUNDLES_DIR = "bundles"            # pack: <model>-<profile>-<format>-<quant>.edgepack
COMPLETE_MARKER = ".complete"      # written last in a stage's output folder
LOGS_DIR = "logs"                  # every stage: <stage>.log, third-party output and progress lines

TRAIN_FILE = "train.jsonl"
HOLDOUT_FILE = "holdout.jsonl"
DATA_REPORT = "report.json"
TRAIN_REPORT = "train_report.json"
LOSS_CURVE_PNG = "loss_curve.png"           # RUN/student/loss_curve.png: the training loss per step
TEACHER_CONTEXT = "teacher_context.json"   # data/: teacher-only prompt turns (demonstrations)
STUDENT_INFO = "student.json"              # student/: kept blocks, params, teacher identity
EVAL_REPORT = "eval.json"                  # RUN/eval.json: `edgepack eval` (teacher vs students)
EXPORT_REPORT = "export.json"
FIDELITY_REPORT = "fidelity.json"            # artifacts/: export fidelity vs the reference
FIDELITY_MARKDOWN = "fidelity.md"           # artifacts/: the same, for people
TEACHER_SOURCE = "source.json"             # teacher/: {spec, kind, path, sha256}
SOFTLABELS_INDEX = "index.json"            # softlabels/: shards, k, samples, identity, bytes, retained mass

# --- run.toml keys ----------------------------------------------------------------------
RUN_SCHEMA = "schema"
RUN_PROFILE = "profile"
RUN_TEACHER = "teacher"
RUN_DATA = "data"
RUN_SEED = "seed"
RUN_CREATED = "created"
RUN_VERSION = "edgepack_version"

# --- bundle manifest keys -----------------------------------------------------------------
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"   # optional: ed25519 signature over manifest.json (runtime/bundle/signing.py)
MANIFEST_SCHEMA_VERSION = 1
M_SCHEMA = "schema_version"
M_MODEL = "model"
M_FORMAT = "format"
M_QUANT = "quant"
M_PROFILE = "profile"
M_FILES = "files"
M_ENTRYPOINT = "entrypoint"
M_GATE = "gate"
M_GATE_STATUS = "gate_status"
M_LINEAGE = "lineage"
M_RUNTIME = "runtime"
M_CHAT_TEMPLATE = "chat_template"
M_PACK = "pack"                    # how/when the bundle was packed (allow_unverified, notes)
M_TASK = "task"                    # optional: the task contract (task.json's object, edgepack/task.py)
M_TASK_SCORES = "task_scores"      # optional: the gated scores under that task (export/pack/pack.py)
BUNDLE_SUFFIX = ".edgepack"

# --- gate verdicts --------------------------------------------------------------------------
PASS = "PASS"
FAIL = "FAIL"
UNVERIFIED = "UNVERIFIED"
