"""The BENCHMARKS.md section on quantization fidelity per type, GGUF and ONNX (bench/export), with
its KLD-vs-size plot (bench/benchmarks.py)."""

from __future__ import annotations

from typing import Any

from benchmarks_doc import Doc, _num, provenance, table



QUANT_PAIRS = (("float", ("F32",), ("fp32",)), ("8-bit", ("Q8_0",), ("int8",)), ("4-bit", ("Q4_K_M", "Q4_0"), ("int4",)))


def section_export(doc: Doc, export: dict[str, Any] | None) -> None:
    if not doc.section("Quantization fidelity per type (GGUF and ONNX)", export,
                       "`bench/export/results.json` does not exist."):
        return
    rows = export.get("results", [])
    doc.add(provenance(export),
            f"Reference: {(export.get('reference') or {}).get('note', 'not recorded')}. KLD = mean KL(reference ‖ "
            "artifact) in nats over distinct contexts of the held-out text; the reference is the F16 GGUF for quantized "
            "GGUFs (llama-perplexity's convention) and transformers float32 for the float GGUFs and every ONNX graph. "
            "Bits/weight = file bytes × 8 / parameters.",
            table(["artifact", "format", "quant", "imatrix", "size MB", "bits/weight", "KLD", "KLD vs", "top-1",
                   "decode tok/s", "holdout accuracy"],
                  [[r.get("artifact"), r.get("format"), r.get("quant"), r.get("imatrix"), r.get("size_mb"),
                    r.get("bits_per_weight"), r.get("kld"), r.get("kld_reference"), r.get("top1"),
                    r.get("decode_tok_s"), r.get("accuracy")] for r in rows], right={4, 5, 6, 8, 9, 10}))
    plain = {(r.get("format"), r.get("quant")): r for r in rows if not r.get("imatrix")}
    side = []
    for label, gguf_quants, onnx_quants in QUANT_PAIRS:
        for gq in gguf_quants:
            g = plain.get(("gguf", gq))
            o = next((plain[("onnx", q)] for q in onnx_quants if ("onnx", q) in plain), None)
            if g or o:
                side.append([label, gq, _num((g or {}).get("size_mb"), ".1f"), _num((g or {}).get("kld"), ".4f"),
                             onnx_quants[0], _num((o or {}).get("size_mb"), ".1f"), _num((o or {}).get("kld"), ".4f")])
    if side:
        doc.add("Side by side (same student, no imatrix):",
                table(["class", "GGUF", "MB", "KLD", "ONNX", "MB", "KLD"], side, right={2, 3, 5, 6}))

    def draw(ax: Any) -> None:
        # Float artifacts (KLD ~1e-6 and below, 2-4x the size) would squash the quantized ones
        # into a corner; they are in the table above.
        quantized = [r for r in rows if isinstance(r.get("kld"), (int, float)) and r["kld"] > 0 and r.get("size_mb")
                     and (r.get("bits_per_weight") or 99) < 12]
        offsets = [(4, 4), (4, -10), (-34, 4), (-34, -10)]
        for fmt, imatrix, marker, face in (("gguf", False, "o", None), ("gguf", True, "o", "none"),
                                           ("onnx", False, "s", None)):
            pts = [r for r in quantized if r.get("format") == fmt and bool(r.get("imatrix")) == imatrix]
            if not pts:
                continue
            label = fmt.upper() + (" + imatrix" if imatrix else "")
            kwargs = {"facecolors": "none", "edgecolors": "C0"} if face == "none" else {}
            ax.scatter([r["size_mb"] for r in pts], [r["kld"] for r in pts], marker=marker, label=label, **kwargs)
            for i, r in enumerate(pts if not imatrix else []):
                ax.annotate(r["quant"], (r["size_mb"], r["kld"]), fontsize=7, xytext=offsets[i % len(offsets)],
                            textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("size (MB)")
        ax.set_ylabel("KLD vs reference (nats, log)")
        ax.set_title("Quantization fidelity: KLD vs size (quantized artifacts)")
        ax.legend(fontsize=8)

    doc.image("quant_kld_vs_size.png", "KLD vs size, GGUF and ONNX", draw)
    targets = export.get("targets") or []
    if targets:
        doc.add("Targets (reported, not enforced):",
                table(["target", "measured", "met"], [[t.get("target"), t.get("measured"), t.get("met")]
                                                       for t in targets], right={1}))
