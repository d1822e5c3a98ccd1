"""Whisper whose encoder cost scales with the clip: truncated log-mel input, sliced positional embeddings.

Whisper pads every clip to 30 s (3000 log-mel frames) and its encoder refuses anything else. For short
clips almost all of that compute is spent on silence, and mean pooling for classification averages over
~96% padding. :func:`allow_short_inputs` swaps the encoder's ``forward`` for one that accepts any length
up to 30 s and adds only the first ``T`` positional embeddings — identical to the original for a
full 30-s input. :class:`WhisperClipClassifier` pools over the frames that hold the clip only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import WhisperForAudioClassification
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder


class ClipWhisperEncoder(WhisperEncoder):
    """A WhisperEncoder that takes ``input_features`` of any length up to ``2 * max_source_positions``."""

    def forward(self, input_features: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> BaseModelOutput:
        max_frames = self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if input_features.shape[-1] > max_frames:
            raise ValueError(f"Whisper input has {input_features.shape[-1]} log-mel frames; at most "
                             f"{max_frames} (30 s) fit its positional embeddings.")
        x = nn.functional.gelu(self.conv1(input_features))
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.embed_positions.weight[: x.shape[1]].to(x.dtype)
        x = nn.functional.dropout(x, p=self.dropout, training=self.training)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            x = layer(x, None)
        return BaseModelOutput(last_hidden_state=self.layer_norm(x))


def allow_short_inputs(model: Any) -> Any:
    """Make every WhisperEncoder inside ``model`` accept clip-length inputs (in place)."""
    for module in model.modules():
        if type(module) is WhisperEncoder:
            module.__class__ = ClipWhisperEncoder
    return model


class WhisperClipClassifier(WhisperForAudioClassification):
    """WhisperForAudioClassification with clip-length inputs and mean pooling over the clip's frames only.

    ``attention_mask`` is the feature extractor's frame mask (1 for frames of the clip, 0 for padding
    added to reach the batch's longest clip). Weights and config are WhisperForAudioClassification's.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        allow_short_inputs(self)

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        hidden = self.encoder(input_features).last_hidden_state
        hidden = self.projector(hidden)
        if attention_mask is not None:
            stride = self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]
            mask = attention_mask[:, ::stride][:, : hidden.shape[1]].to(hidden.dtype).unsqueeze(-1)
            if mask.shape[1] < hidden.shape[1]:
                mask = nn.functional.pad(mask, (0, 0, 0, hidden.shape[1] - mask.shape[1]))
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            pooled = hidden.mean(dim=1)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)
