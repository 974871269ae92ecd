#!/usr/bin/env bash
# lm-evaluation-harness (0.4.13) against `edgepack serve`: the real client, a tiny local task,
# no hub. Runs local-completions on a multiple-choice loglikelihood task (token-id prompts, echo,
# logprobs, max_tokens 1) and a generate_until task with num_concurrent=8, then
# local-chat-completions on the generate_until task; writes bench/clients/results/*.json and
# results.md.
#
#   bash bench/clients/lm_eval.sh                      # a tiny random-init model built here
#   bash bench/clients/lm_eval.sh runs/demo/bundles/x.edgepack   # a bundle (its tokenizer/ is used)
#
# lm-eval lives in its own venv (bench/clients/.venv, git-ignored) that reads the main venv's
# torch and transformers through a .pth file instead of installing a second copy; the main
# venv is never changed. Any lm-eval task works the same way: swap --tasks/--include_path.
set -euo pipefail
cd "$(dirname "$0")/../.."
MAIN_PY=.venv/bin/python
VENV=bench/clients/.venv
OUT=bench/clients/results
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -x "$VENV/bin/lm_eval" ]; then
  "$MAIN_PY" -m venv "$VENV"
  "$MAIN_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
    > "$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/edgepack-main-venv.pth"
  # huggingface-hub and datasets pinned to what the main venv's transformers accepts.
  "$VENV/bin/pip" install -q "lm-eval[api]==0.4.13" "huggingface-hub==$("$MAIN_PY" -c 'import huggingface_hub as h; print(h.__version__)')" "datasets<4.5"
fi

WORK=$(mktemp -d)
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  "$MAIN_PY" - "$WORK" <<'PY'
import sys
from pathlib import Path
from tests.tiny import build_tiny_llama
from edgepack.export.gguf.convert import convert_hf_to_gguf
work = Path(sys.argv[1])
convert_hf_to_gguf(build_tiny_llama(work / "tiny"), work / "tiny-F16.gguf", outtype="F16")
PY
  MODEL=$WORK/tiny-F16.gguf
  TOKENIZER=$WORK/tiny
else
  tar -xf "$MODEL" -C "$WORK" tokenizer
  TOKENIZER=$WORK/tokenizer
fi

PORT=$("$MAIN_PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
.venv/bin/edgepack serve "$MODEL" --port "$PORT" > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  sleep 0.5
done
ID=$(curl -sf "http://127.0.0.1:$PORT/v1/models" | "$MAIN_PY" -c "import json, sys; print(json.load(sys.stdin)['data'][0]['id'])")
BASE=http://127.0.0.1:$PORT/v1
COMMON=(--include_path bench/clients/tasks --seed 1234)
rm -rf "$OUT" && mkdir -p "$OUT"

"$VENV/bin/lm_eval" --model local-completions --tasks edgepack_mc,edgepack_gen "${COMMON[@]}" \
  --model_args "model=$ID,base_url=$BASE/completions,num_concurrent=8,max_retries=3,tokenizer_backend=huggingface,tokenizer=$TOKENIZER,tokenized_requests=True" \
  --output_path "$OUT/completions"
"$VENV/bin/lm_eval" --model local-chat-completions --tasks edgepack_gen --apply_chat_template "${COMMON[@]}" \
  --model_args "model=$ID,base_url=$BASE/chat/completions,num_concurrent=8,max_retries=3" \
  --output_path "$OUT/chat"
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^edgepack_(requests|rejections)_total' | grep -v ' 0$' \
  > "$OUT/server_metrics.txt" || true

"$MAIN_PY" - "$OUT" "$(basename "$MODEL")" "$*" <<'PY'
import json, sys
from pathlib import Path
out, model, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
lines = ["# lm-evaluation-harness 0.4.13 against `edgepack serve`", "",
         f"Command: `{('bash bench/clients/lm_eval.sh ' + args).strip()}` (model: {model}; both clients with "
         "num_concurrent=8 on the server's default queue)", "",
         "| client | task | metric | value | samples |", "| --- | --- | --- | --- | --- |"]
for client in ("completions", "chat"):
    for path in sorted((out / client).rglob("results_*.json"))[-1:]:
        data = json.loads(path.read_text())
        for task, metrics in data["results"].items():
            n = data.get("n-samples", {}).get(task, {}).get("effective", "?")
            for key, value in metrics.items():
                name = key.split(",")[0]
                if name not in ("alias", "sample_len") and "_stderr" not in name and isinstance(value, (int, float)):
                    lines.append(f"| local-{client if client == 'completions' else 'chat-completions'} | {task} "
                                 f"| {name} | {value:.3f} | {n} |")
lines += ["", "The tasks are tiny (bench/clients/tasks: 8 multiple-choice rows, 6 generation rows) and check that",
          "the protocol works end to end (loglikelihood via token-id prompts + echo + logprobs, generation,",
          "chat, 8 concurrent clients); the scores are not a quality measurement.", "",
          "Server counters after the runs (`/metrics`, non-zero only):", "", "```",
          (out / "server_metrics.txt").read_text().strip() if (out / "server_metrics.txt").exists() else "",
          "```"]
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
