"""``finetune export --format gguf`` for causal-lm runs: the merged model written as GGUF, then read back.

The inverse of :func:`finetune_generation.zoo.read_gguf` (transformers' GGUF reader, which converts the
offline SmolLM2 weights): tensor names come from the ``gguf`` package's own name map (the one llama.cpp's
converter and transformers' reader use), the query and key projections are permuted into llama.cpp's
rotary layout (the reader permutes them back), a tied output matrix is left out (the reader ties it again
when ``output.weight`` is absent), and the byte-level BPE tokenizer goes in as ``tokenizer.ggml.*`` (tokens,
types, merges, special ids, chat template).

Weight types: ``f32``; ``f16`` (matrices in half precision, norms in f32, as llama.cpp does); ``q8_0``
(matrices quantised to 8 bits in blocks of 32 with ``gguf.quants``; a matrix whose rows are not a multiple
of 32 stays f16). Checks after writing: the file's metadata and tensor shapes against the model's config,
the tokenizer read back encodes the eval texts to the same ids, and the model read back gives logits
within a bound of the merged model's (f32 1e-4, f16 1e-3, each plus a share of the largest logit:
1e-5 and 2e-3; q8_0 reported only), with the share of positions whose most likely token is the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune import ExportError, RecipeError

ARCHITECTURES = {"llama": "LLAMA"}
WEIGHT_TYPES = ("f32", "f16", "q8_0")
#: The largest |logit difference| allowed between the merged model and the GGUF read back, per type:
#: ``absolute + relative * max |logit|`` (half precision rounds each weight to ~3 significant digits, so its
#: error grows with the logits' scale: SmolLM2-135M, logits up to ~42, differs by ~0.04 in f16).
LOGIT_TOLERANCE = {"f32": (1e-4, 1e-5), "f16": (1e-3, 2e-3)}
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}


def export_gguf(model: Any, tokenizer: Any, folder: Path, quantize: str | None, batch: dict[str, Any] | None,
                name: str) -> dict[str, Any]:
    """Write ``<name>.<type>.gguf`` into ``folder``, read it back and check it; the report for export.json."""
    qtype = (quantize or "f16").lower()
    if qtype not in WEIGHT_TYPES:
        raise RecipeError(f"export: --quantize {quantize!r}: GGUF weight types written here are "
                          f"{', '.join(WEIGHT_TYPES)}.")
    path = Path(folder) / f"{name}.{qtype}.gguf"
    tensors = write_gguf(model, tokenizer, path, qtype, name)
    checks = check_gguf(model, tokenizer, path, qtype, tensors, batch)
    usage = (f"# llama.cpp (https://github.com/ggml-org/llama.cpp): chat with the model\n"
             f"llama-cli -m {path.name} -cnv\n"
             f"# or serve it: llama-server -m {path.name}\n"
             f"# in Python: transformers reads it back (dequantised to float32)\n"
             f"python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer; "
             f"AutoModelForCausalLM.from_pretrained('.', gguf_file='{path.name}'); "
             f"AutoTokenizer.from_pretrained('.', gguf_file='{path.name}')\"\n")
    return {"files": [path.name], "gguf": {"file": path.name, "weight_type": qtype,
                                           "bytes": path.stat().st_size, "tensors": len(tensors)},
            "checks": checks, "usage": usage}


def _permute(weights: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's rotary layout for a query / key projection (what transformers' reader undoes)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _config_numbers(config: Any) -> dict[str, Any]:
    heads = config.num_attention_heads
    rope = getattr(config, "rope_theta", None)
    if rope is None:
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return {"block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
            "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
            "attention.head_count": heads,
            "attention.head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
            "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps), "rope.freq_base": float(rope),
            "rope.dimension_count": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "vocab_size": config.vocab_size}


def write_gguf(model: Any, tokenizer: Any, path: Path, qtype: str,
               name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The GGUF file; returns ``{gguf tensor name: (shape as in PyTorch, stored type)}``."""
    import gguf
    import numpy as np

    config = model.config
    arch_name = getattr(config, "model_type", None)
    if arch_name not in ARCHITECTURES:
        raise RecipeError(f"export: --format gguf writes the {', '.join(ARCHITECTURES)} architecture (Llama, "
                          f"SmolLM2, ...); this run's model is {arch_name!r}. Export it with --format safetensors "
                          "and convert that folder with llama.cpp's convert_hf_to_gguf.py.")
    numbers = _config_numbers(config)
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(numbers["context_length"])
    writer.add_embedding_length(numbers["embedding_length"])
    writer.add_block_count(numbers["block_count"])
    writer.add_feed_forward_length(numbers["feed_forward_length"])
    writer.add_head_count(numbers["attention.head_count"])
    writer.add_head_count_kv(numbers["attention.head_count_kv"])
    writer.add_layer_norm_rms_eps(numbers["attention.layer_norm_rms_epsilon"])
    writer.add_rope_freq_base(numbers["rope.freq_base"])
    writer.add_rope_dimension_count(numbers["rope.dimension_count"])
    writer.add_vocab_size(numbers["vocab_size"])
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config)

    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch_name]), numbers["block_count"])
    tied = bool(getattr(config, "tie_word_embeddings", False))
    written: dict[str, tuple[tuple[int, ...], str]] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"export: no GGUF name for the tensor {hf_name!r} of this {arch_name} model.")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, numbers["attention.head_count"])
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, numbers["attention.head_count"], numbers["attention.head_count_kv"])
        data = np.ascontiguousarray(data)
        stored = "f32"
        if data.ndim >= 2 and qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[
                gguf.GGMLQuantizationType.Q8_0][0] == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            stored = "q8_0"
        elif data.ndim >= 2 and qtype in ("f16", "q8_0"):
            writer.add_tensor(gguf_name, data.astype(np.float16))
            stored = "f16"
        else:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        written[gguf_name] = (tuple(tensor.shape), stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _add_tokenizer(writer: Any, tokenizer: Any, config: Any) -> None:
    """``tokenizer.ggml.*`` from a byte-level BPE tokenizer (the ``gpt2`` tokenizer model of llama.cpp)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise RecipeError("export: --format gguf writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, "
                          f"Qwen); this run's tokenizer is {model.get('type') or type(tokenizer).__name__}.")
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for token_id, token in added.items():
        vocab[token["content"]] = token_id
    size = max(config.vocab_size, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            special = added.get(i, {}).get("special")
            types.append(gguf.TokenType.CONTROL if special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    upstream = str(getattr(config, "finetune_upstream_id", "") or getattr(config, "_name_or_path", ""))
    writer.add_tokenizer_pre("smollm" if "smollm" in upstream.lower() else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def check_gguf(model: Any, tokenizer: Any, path: Path, qtype: str, written: dict[str, Any],
               batch: dict[str, Any] | None) -> dict[str, Any]:
    """Read the file back: metadata and shapes (gguf.GGUFReader), then tokenizer and logits through
    transformers' reader (``zoo.read_gguf``)."""
    import gguf
    import torch

    from finetune_generation.zoo import read_gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    problems = []
    for key, want in _config_numbers(model.config).items():
        field = reader.fields.get(f"{arch}.{key}")
        got = field.contents() if field is not None else None
        if got is None or (abs(float(got) - float(want)) > 1e-6 * max(1.0, abs(float(want)))):
            problems.append(f"{arch}.{key} is {got}, the model's config says {want}")
    stored = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name.lower()) for t in reader.tensors}
    for name, (shape, kind) in written.items():
        if name not in stored:
            problems.append(f"tensor {name} is missing")
        elif stored[name][0] != tuple(shape) or stored[name][1] != kind:
            problems.append(f"tensor {name} reads back as {stored[name]}, written as {(tuple(shape), kind)}")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    if len(tokens) < len(tokenizer):
        problems.append(f"{len(tokens)} tokens in the file, the tokenizer has {len(tokenizer)}")
    if problems:
        raise ExportError(f"export: {path.name} does not read back as written: {'; '.join(problems[:5])}.")
    back, back_tokenizer = read_gguf(path)
    back.eval()
    checks: dict[str, Any] = {"metadata_and_shapes": f"{len(written)} tensors, {len(tokens)} tokens as written",
                              "weight_types": sorted({kind for _, kind in written.values()})}
    if batch is None or "input_ids" not in batch:  # no data, or another batch layout (preference pairs)
        texts = ["What is 12 + 7?", "Convert 3 km to metres."]
        ids = tokenizer(texts, return_tensors="pt", padding=True)
        input_ids, mask = ids["input_ids"], ids["attention_mask"]
    else:
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        texts = [tokenizer.decode(row[m.bool()] if mask is not None else row, skip_special_tokens=False)
                 for row, m in zip(input_ids, mask if mask is not None else input_ids)]
    same = sum(back_tokenizer.encode(t, add_special_tokens=False) == tokenizer.encode(t, add_special_tokens=False)
               for t in texts)
    if same != len(texts):
        raise ExportError(f"export: the tokenizer read back from {path.name} encodes {len(texts) - same} of "
                          f"{len(texts)} eval texts differently from the run's tokenizer.")
    checks["tokenizer_same_ids"] = f"{same}/{len(texts)} eval texts"
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask).logits.float()
        got = back(input_ids=input_ids, attention_mask=mask).logits.float()
    keep = (mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool))
    diff = float((got - expected).abs()[keep].max())
    checks["max_abs_logit_diff"] = diff
    scale = float(expected[keep].abs().max())
    checks["logit_scale"] = scale
    checks["top1_agreement"] = float((got.argmax(-1) == expected.argmax(-1))[keep].float().mean())
    checks["rows"] = int(input_ids.shape[0])
    if qtype in LOGIT_TOLERANCE:
        absolute, relative = LOGIT_TOLERANCE[qtype]
        bound = absolute + relative * scale
        checks["tolerance"] = bound
        if not diff <= bound:
            raise ExportError(f"export: the {qtype} GGUF read back gives logits up to {diff:.3g} away from the "
                              f"merged model's (bound {bound:g}); nothing was written.")
    return checks
