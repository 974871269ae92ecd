"""The exported ONNX folder in clients edgepack did not write: onnxruntime-genai and optimum.

Each client loads the folder as exported (nothing added by the test) and must decode the same
greedy tokens as edgepack's own ``onnx`` backend; onnxruntime-genai's logits at every step
must also match a fresh prefill of the same tokens, so a wrong position or mask wiring in
``genai_config.json`` fails even where the tiny model repeats a token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import InvalidModelFile, UnsupportedArchitecture
from edgepack.export.onnx.convert import OnnxCausalLM, export_onnx
from edgepack.export.onnx.genai import GENAI_CONFIG, GENAI_MODEL_TYPES, genai_config, write_client_files
from edgepack.runtime.backends.onnxrt import OnnxRuntimeBackend
from tests.export.helpers import ARCH_BUILDERS, PROMPTS

try:  # a dev extra (pyproject.toml); missing means the environment is incomplete, not a skip
    import onnxruntime_genai as og
except ImportError as exc:  # pragma: no cover - environment problem
    raise ImportError("onnxruntime-genai is missing: pip install -e '.[dev]'") from exc

NEW_TOKENS = 12
# Max |logit diff| between a decode step and a prefill of the same tokens. fp32: the same graph,
# summation order only. int4: MatMulNBits' int8 activations (accuracy_level 4) round a prefill
# and a decode step differently (0.007 seen, logits span about +-3); a position or mask wired
# wrongly in genai_config.json moves them by 0.4-1.6.
LOGIT_TOL = {"fp32": 1e-4, "int4": 5e-2}


@pytest.fixture(scope="module")
def exported(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ecosystem")
    return {q: export_onnx(tiny_llama_dir, root / q, quant=q)["path"] for q in ("fp32", "int4")}


def _backend_greedy(folder: Path, prompt: str, stop: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids, up to a stop token if ``stop``) from edgepack's onnx backend."""
    backend = OnnxRuntimeBackend.load(folder, threads=1, n_ctx=256)
    ids = backend.tokenize(prompt, parse_special=True)
    return ids, list(backend.generate(ids, max_tokens=NEW_TOKENS, stop_at_eos=stop))


def _genai_greedy(folder: Path, ids: list[int], quant: str) -> tuple[list[int], bool]:
    """onnxruntime-genai's greedy tokens (stop token dropped, and whether it stopped), checking
    each step's logits against a prefill of the same tokens by edgepack's session."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW_TOKENS, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    ref = OnnxCausalLM(folder / "model.onnx")
    eos = set(json.loads((folder / GENAI_CONFIG).read_text())["model"]["eos_token_id"])
    out: list[int] = []
    while not gen.is_done():
        # the logits the next token is picked from (the generator runs the model eagerly: after
        # append_tokens and after each generate_next_token they are the next position's)
        step = np.asarray(gen.get_logits()).reshape(-1)
        want = ref.logits(ids + out)[-1]
        assert float(np.abs(step - want).max()) < LOGIT_TOL[quant], f"step {len(out)}"
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        if token in eos:
            return out, True
        out.append(token)
    return out, False


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_onnxruntime_genai_decodes_like_the_onnx_backend(quant: str, exported: dict[str, Path]) -> None:
    folder = exported[quant]
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    backend = OnnxRuntimeBackend.load(folder, threads=1, n_ctx=256)
    decoded_broken = 0
    for prompt in PROMPTS:
        ids, want = _backend_greedy(folder, prompt)
        assert [int(t) for t in tokenizer.encode(prompt)] == ids  # its own tokenizer reads the folder alike
        got, _ = _genai_greedy(folder, ids, quant)
        assert got == want, prompt
        raw = b"".join(backend.token_bytes(t) for t in got)
        try:  # a random model can emit a broken UTF-8 sequence; the two decoders differ only there
            assert tokenizer.decode(np.array(got, dtype=np.int32)) == raw.decode("utf-8")
        except UnicodeDecodeError:
            decoded_broken += 1
    assert decoded_broken < len(PROMPTS)


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_optimum_generates_from_the_folder(quant: str, exported: dict[str, Path]) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    folder = exported[quant]
    model = ORTModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for prompt in PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt")
        assert sorted(enc) == ["attention_mask", "input_ids"]  # no token_type_ids
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
        new = [int(t) for t in out[0, enc["input_ids"].shape[1]:]]
        ids, want = _backend_greedy(folder, prompt, stop=False)
        assert enc["input_ids"][0].tolist() == ids
        # optimum stops on generation_config's eos (kept in its output), the backend on more tokens
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        assert new == want[:cut] and len(new) == (cut if cut < NEW_TOKENS else NEW_TOKENS)


@pytest.mark.parametrize("name", [*ARCH_BUILDERS, "llama-untied"])
def test_genai_config_follows_each_architecture(name: str, arch_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf_dir = arch_model_dirs[name]
    folder = export_onnx(hf_dir, tmp_path / "onnx", quant="fp32")["path"]
    hf = json.loads((hf_dir / "config.json").read_text())
    model = json.loads((folder / GENAI_CONFIG).read_text())["model"]
    decoder = model["decoder"]
    assert model["type"] == GENAI_MODEL_TYPES[hf["model_type"]] == hf["model_type"]
    assert decoder["head_size"] == (hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    assert (decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == \
        (hf["num_key_value_heads"], hf["num_hidden_layers"])
    assert model["context_length"] == hf["max_position_embeddings"] and hf["eos_token_id"] in model["eos_token_id"]
    ids, want = _backend_greedy(folder, PROMPTS[0])
    assert _genai_greedy(folder, ids, "fp32")[0] == want


def test_every_genai_model_type_is_decoded_here(arch_model_dirs: dict[str, Path]) -> None:
    """A row of GENAI_MODEL_TYPES without a tiny model above would be an untested promise."""
    tested = {json.loads((arch_model_dirs[n] / "config.json").read_text())["model_type"]
              for n in ["LlamaForCausalLM", *ARCH_BUILDERS]}
    assert set(GENAI_MODEL_TYPES) == tested


def test_genai_config_refuses_a_graph_that_disagrees(exported: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(exported["fp32"], folder)
    hf = json.loads((folder / "config.json").read_text())
    with pytest.raises(InvalidModelFile, match="num_key_value_heads: graph 2, config.json 4"):
        genai_config(folder, {**hf, "num_key_value_heads": 4})
    with pytest.raises(InvalidModelFile, match="num_hidden_layers: graph 2, config.json 3"):
        genai_config(folder, {**hf, "num_hidden_layers": 3})
    with pytest.raises(UnsupportedArchitecture, match="'opt'") as info:
        genai_config(folder, {**hf, "model_type": "opt"})
    assert "llama" in info.value.hint
    # an exportable type onnxruntime-genai is not tested with: no config, said so, tokenizer still fixed
    (folder / GENAI_CONFIG).unlink()
    done = write_client_files(folder, {**hf, "model_type": "opt"})
    assert not (folder / GENAI_CONFIG).exists() and done["genai_config"] is None and "'opt'" in done["genai_note"]
    assert done["tokenizer_model_input_names"] == ["input_ids", "attention_mask"]
