"""edgepack's HF→GGUF exporter against llama.cpp's own ``convert_hf_to_gguf.py``, tensor for tensor
and key for key, on tiny random-init Gemma 3 (text) and Phi-3 models (plain, LongRoPE, a padded vocab).

    .venv/bin/python bench/export/converter_parity.py --llamacpp /tmp/llamacpp-conv \\
        --python /tmp/conv-venv/bin/python --out bench/export/converter_parity.json

``--llamacpp`` is a llama.cpp snapshot holding ``convert_hf_to_gguf.py``, ``conversion/`` and
``gguf-py/`` (llama-cpp-python's sdist vendors the llama.cpp it runs, in ``vendor/llama.cpp``);
``--python`` a separate environment with the converter's requirements (torch, transformers,
sentencepiece, numpy, safetensors) — never edgepack's own venv. That Python also trains the
SentencePiece ``tokenizer.model`` of each model (edgepack's venv has no sentencepiece) and has
transformers convert it to the ``tokenizer.json`` that edgepack reads; llama.cpp's Gemma3 and Phi3
converters read ``tokenizer.model``. Both converters read the same folder.

Per model and outtype (F16, F32) it compares every tensor (name, shape, type, bytes) and every
metadata key (type and value), then lets llama.cpp's runtime judge the differences: both files
tokenize the test strings and give logits on the test prompts, against transformers. Each
metadata difference is labelled from :data:`EXPLAINED` (a name, or a key whose absence llama.cpp
reads as the same value); anything else is reported as unexplained.

Writes the JSON and a markdown table beside it (``.md``), with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

OUTTYPES = ("F16", "F32")
TOKENIZER_FORMS = ("gemma", "llama2")
PHI3_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# Metadata differences and why llama.cpp computes the same with either file ("{arch}" is the
# GGUF architecture). Checked against the vendored llama.cpp source (llama-vocab.cpp,
# llama-hparams.h, models/gemma3.cpp) and, below, by the runtime itself.
EXPLAINED: dict[str, str] = {
    "general.name": "name only: edgepack writes the folder name, llama.cpp a title-cased one",
    "general.size_label": "name only: llama.cpp's parameter-count label",
    "tokenizer.ggml.add_sep_token": "llama.cpp writes false; absent reads as false for a llama (SPM) vocab",
    "tokenizer.ggml.add_space_prefix": "edgepack writes true for Llama 2 / Phi-3 tokenizers; absent reads as "
                                       "true for a llama (SPM) vocab (llama-vocab.cpp)",
    "{arch}.vocab_size": "edgepack writes it; llama.cpp takes n_vocab from tokenizer.ggml.tokens",
    "{arch}.rope.dimension_count": "edgepack writes head_dim; absent reads as head_dim (key_length)",
    "{arch}.rope.freq_base_swa": "llama.cpp writes rope_local_base_freq (10000); absent reads as 10000 "
                                 "(llama-hparams.h), and edgepack refuses any other value",
    "tokenizer.ggml.scores": "edgepack derives SentencePiece scores from the tokenizer.json merge order "
                             "(-rank of the first merge making the token), llama.cpp reads them from "
                             "tokenizer.model; the token-id column (llama.cpp's tokenizer on both files) is the judge",
}


FIXTURES = (
    "Models: tests/export/helpers.py's tiny random-init builders (Gemma 3: 6 layers, head_dim 16, "
    "sliding window 8, tied; Phi-3: 2 layers, untied; Phi-3 LongRoPE: partial rotary 0.75 and "
    "long/short factors, 1024 of 512 positions; Phi-3 with 12 more embedding rows than tokens). "
    "Tokenizers: a SentencePiece BPE `tokenizer.model` (byte fallback) trained on the test strings and "
    "converted by transformers to `tokenizer.json`: Gemma's form (ids pad/eos/bos/unk, <start_of_turn>, "
    "<end_of_turn>, a tab piece; GemmaConverter's Split(' ') pre-tokenizer) and Llama 2 / Phi-3's "
    "(Prepend + Replace normalizer, <|endoftext|> <|user|> <|assistant|> <|end|> added). The strings: the "
    "test strings and prompts plus 400 random texts of vocabulary pieces and odd characters.")


# --- run by --python: the SentencePiece tokenizers -------------------------------------------

def build_spm_tokenizers(out: Path) -> None:
    """Train a SentencePiece BPE ``tokenizer.model`` per form and save the HF tokenizer that
    transformers converts from it (Gemma's form; Llama 2 / Phi-3's, with Phi-3's added tokens)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizerFast, LlamaTokenizerFast

    from tests.export.helpers import PROMPTS, SPM_STRINGS, SPM_TEMPLATE

    out.mkdir(parents=True, exist_ok=True)
    lines = [*SPM_STRINGS, *PROMPTS[::2]] * 3 + ["the pump the motor the valve alarm alarm pressure"] * 5
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8")
    common = dict(input=str(corpus), model_type="bpe", vocab_size=400, byte_fallback=True,
                  character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
                  split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2)
    for form in TOKENIZER_FORMS:
        d = out / form
        d.mkdir(exist_ok=True)
        if form == "gemma":
            # Gemma's ids (pad, eos, bos, unk first) and a "\t" piece: without one transformers'
            # GemmaConverter renames <0x09> to "\t" (real Gemma vocabularies have both).
            spm.SentencePieceTrainer.train(**common, model_prefix=str(d / "tokenizer"), add_dummy_prefix=False,
                                           pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                                           eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                                           user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\t"])
            tok = GemmaTokenizerFast(vocab_file=str(d / "tokenizer.model"), from_slow=True)
            tok.chat_template = SPM_TEMPLATE
        else:
            spm.SentencePieceTrainer.train(**common, model_prefix=str(d / "tokenizer"), add_dummy_prefix=True,
                                           unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
            # legacy + add_prefix_space: Phi-3's shipped tokenizer.json form (Prepend + Replace normalizer).
            tok = LlamaTokenizerFast(vocab_file=str(d / "tokenizer.model"), from_slow=True, legacy=True,
                                     add_prefix_space=True)
            tok.add_special_tokens({"pad_token": "<|endoftext|>",
                                    "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
            tok.chat_template = PHI3_TEMPLATE
        tok.save_pretrained(d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("add_prefix_space", None)  # else loading it re-converts from tokenizer.model (needs sentencepiece)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


# --- run by edgepack's venv -------------------------------------------------------------------

def build_models(tok: Path, root: Path) -> dict[str, Path]:
    """The HF dirs, built as tests/export/helpers.py builds them, with ``tokenizer.model`` added."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from tests.export.helpers import _common, _save_model, build_gemma3, build_phi3, build_phi3_longrope

    def phi3_padded(tok_dir: Path, out: Path) -> Path:
        # Phi-3-mini's shape: more embedding rows (32064) than tokens (32011), padded in the vocab.
        common = _common(tok_dir)
        cfg = Phi3Config(**{**common, "vocab_size": common["vocab_size"] + 12}, tie_word_embeddings=False,
                         original_max_position_embeddings=512, architectures=["Phi3ForCausalLM"])
        return _save_model(Phi3ForCausalLM, cfg, tok_dir, out, seed=9)

    builders = {"gemma3": (build_gemma3, "gemma"), "phi3": (build_phi3, "llama2"),
                "phi3-longrope": (build_phi3_longrope, "llama2"), "phi3-padded-vocab": (phi3_padded, "llama2")}
    dirs = {}
    for name, (build, form) in builders.items():
        dirs[name] = build(tok / form, root / name)
        shutil.copy(tok / form / "tokenizer.model", dirs[name] / "tokenizer.model")
    return dirs


def read_gguf(path: Path) -> tuple[dict[str, tuple[Any, list[str]]], dict[str, tuple[tuple[int, ...], str, bytes]], list[str]]:
    """(key → (value, value types), tensor → (shape, type, bytes), tensor order) of a GGUF file."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    fields = {k: (f.contents(), [gguf.GGUFValueType(t).name for t in f.types])
              for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name, np.asarray(t.data).tobytes())
               for t in reader.tensors}
    return fields, tensors, [t.name for t in reader.tensors]


def _short(value: Any) -> Any:
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return value if not isinstance(value, str) or len(value) < 80 else value[:77] + "..."


def compare(ours: Path, theirs: Path, arch: str) -> dict[str, Any]:
    """Tensor-for-tensor and key-for-key differences of two GGUF files."""
    import numpy as np

    ef, et, eorder = read_gguf(ours)
    lf, lt, lorder = read_gguf(theirs)
    tensor_diffs = []
    for name in sorted(set(et) & set(lt)):
        (es, ety, eb), (ls, lty, lb) = et[name], lt[name]
        if (es, ety, eb) != (ls, lty, lb):
            row: dict[str, Any] = {"tensor": name, "edgepack": [list(es), ety], "llama.cpp": [list(ls), lty]}
            if es == ls and ety == lty and ety in ("F32", "F16"):
                dt = np.float32 if ety == "F32" else np.float16
                row["max_abs_diff"] = float(np.abs(np.frombuffer(eb, dt).astype(np.float64)
                                                   - np.frombuffer(lb, dt).astype(np.float64)).max())
            tensor_diffs.append(row)
    explained = {k.replace("{arch}", arch): why for k, why in EXPLAINED.items()}
    key_diffs = []
    for key in sorted(set(ef) | set(lf)):
        e, l = ef.get(key), lf.get(key)
        if e == l:
            continue
        row = {"key": key, "edgepack": None if e is None else _short(e[0]),
               "llama.cpp": None if l is None else _short(l[0]),
               "kind": "only edgepack" if l is None else "only llama.cpp" if e is None else "value"}
        if e is not None and l is not None and isinstance(e[0], list) and len(e[0]) == len(l[0]):
            row["entries_differing"] = sum(a != b for a, b in zip(e[0], l[0]))
        if e is not None and l is not None and e[1] != l[1]:
            row["types"] = {"edgepack": e[1], "llama.cpp": l[1]}
        row["why"] = explained.get(key, "UNEXPLAINED")
        key_diffs.append(row)
    return {
        "tensors": {"edgepack": len(et), "llama.cpp": len(lt), "identical": len(set(et) & set(lt)) - len(tensor_diffs),
                    "only_edgepack": sorted(set(et) - set(lt)), "only_llama.cpp": sorted(set(lt) - set(et)),
                    "differing": tensor_diffs, "same_order": eorder == lorder,
                    # llama.cpp writes generated tensors (rope_factors_*) first, edgepack last;
                    # llama.cpp finds tensors by name.
                    "order": {} if eorder == lorder else {"edgepack": [*eorder[:2], "...", *eorder[-2:]],
                                                          "llama.cpp": [*lorder[:2], "...", *lorder[-2:]]}},
        "metadata": {"edgepack": len(ef), "llama.cpp": len(lf), "identical": len(set(ef) & set(lf)) - sum(
            1 for d in key_diffs if d["kind"] == "value"), "differing": key_diffs},
    }


FUZZ_STRINGS = 400
FUZZ_CHARS = list("0123456789 .,;:!?-_()[]{}<>'\"/\\@#$%^&*+=~`|\n\t  ") + list("éüßøñçŵẞ∮→日本語中文한국어🙂🚀⛽")


def fuzz_strings(tok: Any, n: int, seed: int = 0) -> list[str]:
    """Random texts of vocabulary pieces (▁ as a space) and odd characters: where the two
    files' scores disagree on which merge comes first, llama.cpp would split them differently."""
    import random

    rng = random.Random(seed)
    added = set(tok.get_added_vocab())
    pieces = sorted(p.replace("\u2581", " ") for p in tok.get_vocab() if p not in added and not p.startswith("<0x"))
    return ["".join(rng.choice(pieces) if rng.random() < 0.8 else rng.choice(FUZZ_CHARS)
                    for _ in range(rng.randint(1, 16))) for _ in range(n)]


def runtime_judge(hf_dir: Path, ours: Path, theirs: Path) -> dict[str, Any]:
    """llama.cpp's verdict: token ids of the test strings (both files, transformers) and logits on
    the test prompts (both files, transformers)."""
    import numpy as np
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from tests.export.helpers import PROMPTS, SPM_STRINGS, TOKENIZER_STRINGS, hf_logits, llama_logits

    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = list(dict.fromkeys([*SPM_STRINGS, *TOKENIZER_STRINGS, *PROMPTS, "ŵ∮ ẞ ⛽ unseen text",
                                *fuzz_strings(tok, FUZZ_STRINGS)]))
    vocabs = [Llama(str(p), vocab_only=True, verbose=False) for p in (ours, theirs)]
    try:
        ids = [[v.tokenize(t.encode(), add_bos=False, special=True) for t in texts] for v in vocabs]
    finally:
        for v in vocabs:
            v.close()
    hf_ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    logits = []
    for prompt in PROMPTS:
        x = tok.encode(prompt, add_special_tokens=False)
        ref, a, b = hf_logits(hf_dir, x), llama_logits(ours, x), llama_logits(theirs, x)
        logits.append({"tokens": len(x), "edgepack_vs_llama.cpp_max_abs": float(np.abs(a - b).max()),
                       "edgepack_vs_hf_max_abs": float(np.abs(a - ref).max()),
                       "llama.cpp_vs_hf_max_abs": float(np.abs(b - ref).max()),
                       "same_argmax": bool(np.array_equal(a.argmax(-1), b.argmax(-1))
                                           and np.array_equal(a.argmax(-1), ref.argmax(-1)))})
    return {"strings": len(texts),
            "same_ids_edgepack_llama.cpp": sum(a == b for a, b in zip(*ids)),
            "same_ids_edgepack_hf": sum(a == b for a, b in zip(ids[0], hf_ids)),
            "same_ids_llama.cpp_hf": sum(a == b for a, b in zip(ids[1], hf_ids)),
            "differing_strings": [t for t, a, b in zip(texts, *ids) if a != b],
            "logits": logits}


def _converter_env(python: Path) -> dict[str, str]:
    code = ("import json, numpy, safetensors, sentencepiece, torch, transformers; print(json.dumps({m.__name__: "
            "m.__version__ for m in (torch, transformers, sentencepiece, numpy, safetensors)}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return {"python": str(python), **json.loads(done.stdout)}


def _llamacpp_commit(folder: Path, given: str | None) -> str:
    if given:
        return given
    done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown (pass --llamacpp-commit)"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = ["# edgepack's GGUF exporter vs llama.cpp's convert_hf_to_gguf.py", "",
             f"`{result['command']}`", "",
             f"llama.cpp {result['llamacpp_commit']}: its `convert_hf_to_gguf.py` (in a separate venv: "
             + ", ".join(f"{k} {v}" for k, v in result["converter_env"].items() if k != "python")
             + f") and its runtime (llama-cpp-python {result['llama_cpp_python']}); "
             f"{result['machine'].get('cpu')}, {result['machine'].get('cpu_count')} cores; {result['seconds']:.0f} s.",
             "", FIXTURES, "",
             "| model | outtype | tensors identical (name, shape, type, bytes) | tensor order | metadata keys "
             "identical | differing keys (why) | token ids equal (of strings) | logits max abs diff "
             "edgepack vs llama.cpp file | vs transformers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["models"]:
        t, m, j = row["compare"]["tensors"], row["compare"]["metadata"], row["runtime"]
        keys = "; ".join(f"`{d['key']}` ({d['kind']}{', ' + str(d['entries_differing']) + ' entries' if 'entries_differing' in d else ''})"
                         for d in m["differing"])
        lines.append(
            f"| {row['model']} | {row['outtype']} | {t['identical']}/{max(t['edgepack'], t['llama.cpp'])} | "
            f"{'same' if t['same_order'] else 'differs'} | {m['identical']} | {keys} | "
            f"{j['same_ids_edgepack_llama.cpp']}/{j['strings']} | "
            f"{max(x['edgepack_vs_llama.cpp_max_abs'] for x in j['logits']):.3g} | "
            f"{max(x['edgepack_vs_hf_max_abs'] for x in j['logits']):.3g} |")
    lines += ["", "Why each metadata key differs:", ""]
    seen = {d["key"]: d["why"] for row in result["models"] for d in row["compare"]["metadata"]["differing"]}
    lines += [f"- `{k}`: {why}" for k, why in seen.items()]
    moved = {row["model"]: row["compare"]["tensors"]["order"] for row in result["models"]
             if not row["compare"]["tensors"]["same_order"]}
    if moved:
        lines += ["", "Tensor order: llama.cpp writes the tensors it generates (LongRoPE's `rope_factors_long/short`) "
                  f"first, edgepack last; llama.cpp looks tensors up by name ({json.dumps(moved)})."]
    lines += ["", result["summary"], ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llamacpp", type=Path, help="folder with convert_hf_to_gguf.py, conversion/, gguf-py/")
    parser.add_argument("--python", type=Path, help="the converter's Python (its own venv)")
    parser.add_argument("--llamacpp-commit", help="recorded in the results (default: git rev-parse in --llamacpp)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/export/converter_parity.json")
    parser.add_argument("--spm-tokenizers", type=Path, help=argparse.SUPPRESS)  # internal: run by --python
    args = parser.parse_args()
    if args.spm_tokenizers:
        build_spm_tokenizers(args.spm_tokenizers)
        return
    if args.llamacpp is None or args.python is None or not (args.llamacpp / "convert_hf_to_gguf.py").is_file():
        parser.error("--llamacpp DIR (holding convert_hf_to_gguf.py) and --python PATH are required")

    import llama_cpp

    from edgepack.export.gguf.convert import convert_hf_to_gguf
    from edgepack.provenance import machine_info

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepack-converter-parity-") as tmp:
        root = Path(tmp)
        subprocess.run([str(args.python), __file__, "--spm-tokenizers", str(root / "tok")], check=True, env=env)
        dirs = build_models(root / "tok", root / "models")
        for name, hf_dir in dirs.items():
            config = json.loads((hf_dir / "config.json").read_text())
            arch = {"Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3"}[config["architectures"][0]]
            for outtype in OUTTYPES:
                ours, theirs = root / f"{name}-edgepack-{outtype}.gguf", root / f"{name}-llamacpp-{outtype}.gguf"
                convert_hf_to_gguf(hf_dir, ours, outtype=outtype)
                done = subprocess.run([str(args.python), str(args.llamacpp / "convert_hf_to_gguf.py"), str(hf_dir),
                                       "--outfile", str(theirs), "--outtype", outtype.lower()],
                                      capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise SystemExit(f"llama.cpp's converter failed on {name}:\n{done.stderr[-3000:]}")
                rows.append({"model": name, "architecture": config["architectures"][0], "outtype": outtype,
                             "compare": compare(ours, theirs, arch), "runtime": runtime_judge(hf_dir, ours, theirs)})
                print(f"{name} {outtype}: done", flush=True)
    unexplained = [(r["model"], d["key"]) for r in rows for d in r["compare"]["metadata"]["differing"]
                   if d["why"] == "UNEXPLAINED"]
    tensor_diffs = [(r["model"], r["outtype"]) for r in rows if r["compare"]["tensors"]["differing"]
                    or r["compare"]["tensors"]["only_edgepack"] or r["compare"]["tensors"]["only_llama.cpp"]]
    token_diffs = [(r["model"], r["outtype"]) for r in rows if r["runtime"]["differing_strings"]]
    summary = (f"Tensors: {'every tensor identical in name, shape, type and bytes' if not tensor_diffs else f'differences in {tensor_diffs}'}. "
               f"Metadata: {'every difference explained' if not unexplained else f'unexplained {unexplained}'}. "
               f"llama.cpp tokenizes every string {'the same with both files' if not token_diffs else f'differently in {token_diffs}'}.")
    result = {"command": command, "llamacpp_commit": _llamacpp_commit(args.llamacpp, args.llamacpp_commit),
              "llama_cpp_python": llama_cpp.__version__, "converter_env": _converter_env(args.python),
              "machine": machine_info(),
              "seconds": round(time.perf_counter() - t0, 1), "explained": EXPLAINED, "summary": summary, "models": rows}
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    write_markdown(result, args.out.with_suffix(".md"))
    print(summary)


if __name__ == "__main__":
    main()
